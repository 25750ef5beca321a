# The image's hardening without the EC2 parts (metadata service, SSM, the disk image):
# the appliance profile that nixos/ami.nix builds on, seen from another machine.
# Only port 80 answers through the firewall, there is no SSH daemon, the closure has no
# channel and no rebuild tools, and the agent runs as a locked-down dynamic user.
{ self, ... }:
{
  name = "amictl-appliance";

  nodes = {
    server =
      { pkgs, ... }:
      {
        imports = [ ../appliance.nix ];

        # As in the agent test: no Amazon Time Sync Service in a VM.
        services.ami-agent.driftSources = [ "http://127.0.0.1/" ];

        # A second listener that the firewall must hide: it answers locally, not outside.
        systemd.services.decoy = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig = {
            DynamicUser = true;
            ExecStart = "${pkgs.python3}/bin/python3 -m http.server --bind 0.0.0.0 --directory /var/empty 8080";
          };
        };
      };

    client =
      { pkgs, ... }:
      {
        environment.systemPackages = [
          pkgs.curl
          pkgs.netcat
        ];
      };
  };

  testScript =
    { nodes, ... }:
    # The configuration, where a VM test cannot look: a test VM never has a channel
    # directory whatever the setting, so the setting itself is what is checked.
    assert !nodes.server.nix.channel.enable;
    ''
    start_all()
    server.wait_for_unit("ami-agent.service")
    server.wait_for_open_port(80)
    server.wait_for_unit("decoy.service")
    server.wait_for_open_port(8080)
    client.wait_for_unit("multi-user.target")

    with subtest("port 80 answers from outside"):
        client.wait_until_succeeds("curl --fail --silent --max-time 5 http://server/ | grep -F 'Hello, world!'")
        client.succeed("curl --fail --silent --max-time 5 http://server/version.txt")

    with subtest("nothing else does: no SSH, and other listeners stay behind the firewall"):
        server.fail("systemctl cat sshd.service")
        server.wait_for_closed_port(22)
        # nc -z exits 0 only when the port accepts a connection (refused or dropped: 1).
        client.succeed("nc -z -w 5 server 80")
        client.fail("nc -z -w 5 server 22")
        # The decoy listens (wait_for_open_port(8080) above) but is not reachable.
        client.fail("nc -z -w 5 server 8080")

    with subtest("the health check passes, by the path SSM Run Command uses"):
        server.succeed("/run/current-system/sw/bin/ami-agent check")

    with subtest("a small closure: no channel, no rebuild tools, no manuals"):
        # nix.channel.enable = false removes nix-channel from the system's nix.
        server.fail("command -v nix-channel")
        server.fail("command -v nixos-rebuild")
        server.fail("command -v nixos-option")
        server.fail("command -v man")

    with subtest("the agent runs as a locked-down dynamic user"):
        props = server.succeed(
            "systemctl show ami-agent.service --property "
            "DynamicUser,NoNewPrivileges,ProtectSystem,ProtectHome,PrivateTmp,PrivateDevices,"
            "CapabilityBoundingSet,AmbientCapabilities,MemoryDenyWriteExecute,RestrictNamespaces"
        )
        for expected in [
            "DynamicUser=yes",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "CapabilityBoundingSet=cap_net_bind_service",
            "AmbientCapabilities=cap_net_bind_service",
            "MemoryDenyWriteExecute=yes",
            "RestrictNamespaces=yes",
        ]:
            assert expected in props, f"{expected} not in:\n{props}"
        user = server.succeed("ps -o user= -p $(systemctl show --property MainPID --value ami-agent.service)").strip()
        assert user != "root", f"the agent runs as {user}"
  '';
}
