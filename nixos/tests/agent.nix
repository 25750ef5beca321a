# services.ami-agent on its own: serves the site, passes its health check, heals deleted
# content, and systemd brings it back when it is killed or hangs.
#
# Collected by flake.nix: each file in this directory is a function of { self, ... } that
# returns the argument of pkgs.testers.runNixOSTest.
{ self, ... }:
{
  name = "ami-agent";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.agent ];
      environment.systemPackages = [ pkgs.curl ];

      services.ami-agent = {
        enable = true;
        # The VM reaches no Amazon Time Sync Service; measure against the agent's own Date
        # header instead, which exercises the drift path without waiting on a timeout.
        driftSources = [ "http://127.0.0.1/" ];
        # Short enough to keep the test quick, and still under half the watchdog.
        healthInterval = 2;
        watchdogSec = 10;
      };
    };

  testScript =
    { nodes, ... }:
    let
      cfg = nodes.machine.services.ami-agent;
    in
    ''
      import json

      served = "/var/lib/ami-agent/www"

      def main_pid():
          return machine.succeed("systemctl show --property MainPID --value ami-agent.service").strip()

      def wait_for_new_main_pid(old):
          machine.wait_until_succeeds(
              f"pid=$(systemctl show --property MainPID --value ami-agent.service); "
              f"[ \"$pid\" != 0 ] && [ \"$pid\" != {old} ]",
              timeout=120,
          )
          machine.wait_for_unit("ami-agent.service")
          machine.wait_for_open_port(80)

      start_all()
      machine.wait_for_unit("ami-agent.service")
      machine.wait_for_open_port(80)

      with subtest("serves the site's version.txt"):
          served_version = machine.succeed("curl --fail --silent --show-error http://127.0.0.1/version.txt")
          expected_version = machine.succeed("cat ${cfg.content}/version.txt")
          assert served_version == expected_version, f"{served_version!r} != {expected_version!r}"
          machine.succeed("curl --fail --silent http://127.0.0.1/ | grep -F 'Hello, world!'")
          machine.succeed("curl --fail --silent http://127.0.0.1/healthz")

      with subtest("the open-file limit covers max_connections (4096 by default)"):
          pid = machine.succeed("systemctl show --property MainPID --value ami-agent.service").strip()
          limits = machine.succeed(f"grep -F 'Max open files' /proc/{pid}/limits").split()
          soft, hard = int(limits[3]), int(limits[4])
          assert soft == hard == 4096 + 1024, f"open-file limit {soft}/{hard}"

      with subtest("the health check passes, by the path SSM Run Command uses"):
          machine.succeed("/run/current-system/sw/bin/ami-agent check")

      with subtest("a deleted file is healed with the manifest's sha256"):
          manifest = json.loads(machine.succeed("cat ${cfg.manifest}"))
          entry = next(f for f in manifest["files"] if f["path"] == "index.html")
          machine.succeed(f"rm {served}/index.html")
          machine.wait_until_succeeds(
              f"echo '{entry['sha256']}  {served}/index.html' | sha256sum --check --status",
              timeout=60,
          )
          machine.succeed("curl --fail --silent http://127.0.0.1/ | grep -F 'Hello, world!'")

      with subtest("SIGKILL: systemd restarts the agent"):
          before = main_pid()
          machine.succeed("systemctl kill --signal=KILL ami-agent.service")
          wait_for_new_main_pid(before)
          machine.succeed("curl --fail --silent http://127.0.0.1/version.txt")

      with subtest("SIGSTOP: the watchdog restarts the hung agent"):
          before = main_pid()
          machine.succeed("systemctl kill --signal=STOP ami-agent.service")
          # WatchdogSec is 10 s; allow for the abort, the restart delay and a slow VM.
          wait_for_new_main_pid(before)
          machine.succeed("curl --fail --silent http://127.0.0.1/version.txt")
          machine.succeed("journalctl --unit ami-agent.service | grep -F 'Watchdog timeout'")

      with subtest("nothing but the agent listens beyond loopback"):
          local = ("127.", "[::1]", "[::ffff:127.")
          outside = set()
          for line in machine.succeed("ss -H --tcp --listening --numeric").splitlines():
              addr, port = line.split()[3].rsplit(":", 1)
              if not addr.startswith(local):
                  outside.add(port)
          assert outside == {"80"}, f"listening beyond loopback: {outside}"
    '';
}
