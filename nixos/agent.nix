# services.ami-agent: serves one release's static site, heals it on disk, reports clock and
# content drift and answers health checks (locally, through SSM, or from a load balancer).
#
# The defaults come from the amictl flake's overlay (`pkgs.ami-agent`, `pkgs.amictl-site`);
# without the overlay, set `package`, `content` and `manifest` yourself.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    types
    ;

  cfg = config.services.ami-agent;
  settingsFormat = pkgs.formats.toml { };

  # The agent rewrites damaged files in the directory it serves, so it cannot serve the
  # read-only store copy: every start copies `content` here, fresh.
  stateDir = "/var/lib/ami-agent";
  servedDir = "${stateDir}/www";

  # Config keys the module writes from its own options; `settings` must not set them, or
  # the firewall and the assertions would describe something else than what runs.
  ownedKeys = [
    "root"
    "manifest"
    "listen"
    "health_interval"
    "drift_sources"
  ];
  # The other keys the agent's config file accepts (it rejects unknown keys at start; we
  # reject them at evaluation, which is earlier and names the option).
  passThroughKeys = [
    "drift_interval"
    "max_connections"
    "header_read_timeout"
    "keep_alive_timeout"
    "send_timeout"
    "shutdown_timeout"
    "reuse_port"
  ];

  # `ADDR:PORT` as the agent parses it (a socket address: IPv4, or IPv6 in brackets; no
  # host names). The port has no leading zero and is checked against 65535 below.
  # (`[[]` is a literal `[` in a POSIX regex.)
  listenParts = builtins.match "([0-9.]+|[[][0-9A-Fa-f:.]+]):([1-9][0-9]{0,4})" cfg.listen;
  port = if listenParts == null then null else lib.toInt (lib.elemAt listenParts 1);
  listenValid = port != null && port <= 65535;

  driftSourceValid = source: builtins.match "(ntp|http|https)://[^/].*" source != null;

  agentConfig = {
    root = servedDir;
    listen = cfg.listen;
    health_interval = cfg.healthInterval;
    drift_sources = cfg.driftSources;
  }
  // lib.optionalAttrs (cfg.manifest != null) { manifest = "${cfg.manifest}"; }
  // cfg.settings;

  configFile = settingsFormat.generate "ami-agent.toml" agentConfig;

  # One descriptor per connection plus the agent's own (listener, self-checks, files,
  # clock probes). systemd's default soft limit, 1024, is below the default 4096
  # connections: an idle flood would then exhaust descriptors long before the slots.
  maxConnections = cfg.settings.max_connections or 4096;
  openFileLimit = maxConnections + 1024;

  coreutils = "${pkgs.coreutils}/bin";
in
{
  options.services.ami-agent = {
    enable = mkEnableOption "ami-agent, the amictl release server with self-healing content and health checks";

    package = mkPackageOption pkgs "ami-agent" { };

    site = mkPackageOption pkgs "amictl-site" {
      extraDescription = ''
        Its `www/` and `manifest.json` are the defaults of
        {option}`services.ami-agent.content` and {option}`services.ami-agent.manifest`.
      '';
    };

    content = mkOption {
      type = types.path;
      default = "${cfg.site}/www";
      defaultText = literalExpression ''"''${config.services.ami-agent.site}/www"'';
      description = ''
        The directory to serve. It is copied to `${servedDir}` at every start of the
        service, so that the agent can heal the copy it serves; the original stays untouched.
      '';
    };

    manifest = mkOption {
      type = types.nullOr types.path;
      default = "${cfg.site}/manifest.json";
      defaultText = literalExpression ''"''${config.services.ami-agent.site}/manifest.json"'';
      description = ''
        The manifest (`ami-agent manifest` output) listing every served file with its size and
        sha256. The agent heals files that drift from it. With `null` the agent derives one from
        the content at start (the release is then whatever the content holds).
      '';
    };

    listen = mkOption {
      type = types.str;
      default = "0.0.0.0:80";
      example = "[::]:8080";
      description = ''
        The socket address to listen on, `ADDR:PORT` (IPv6 in brackets). `ami-agent check`
        looks at `http://127.0.0.1/` unless given `--url`, so a port other than 80 needs
        `--url` there.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = true;
      description = "Whether to open the port of {option}`services.ami-agent.listen` in the firewall.";
    };

    healthInterval = mkOption {
      type = types.ints.positive;
      default = 10;
      description = ''
        Seconds between two checks of the served files (and watchdog keep-alives). Must be
        under half of {option}`services.ami-agent.watchdogSec`.
      '';
    };

    watchdogSec = mkOption {
      type = types.ints.positive;
      default = 30;
      description = ''
        systemd's `WatchdogSec`: an agent that stops reporting for this long (hung, stopped,
        deadlocked) is killed and restarted.
      '';
    };

    driftSources = mkOption {
      type = types.listOf types.str;
      default = [ "ntp://169.254.169.123" ];
      example = [
        "ntp://169.254.169.123"
        "https://aws.amazon.com/"
      ];
      description = ''
        Reference clocks for the drift report: `ntp://HOST[:PORT]`, `http://HOST[/PATH]` or
        `https://HOST[/PATH]` (the `Date` header). The default is the Amazon Time Sync
        Service every EC2 instance reaches. An empty list means the agent's built-in default.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = settingsFormat.type; };
      default = { };
      example = {
        max_connections = 512;
        shutdown_timeout = 10;
      };
      description = ''
        Further keys of the agent's TOML config file (snake_case):
        ${lib.concatMapStringsSep ", " (key: "`${key}`") passThroughKeys}.
        The keys that have options of their own (${
          lib.concatMapStringsSep ", " (key: "`${key}`") ownedKeys
        }) are set through those options.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = listenValid;
        message = ''
          services.ami-agent.listen must be ADDR:PORT with an IPv4 address or an IPv6 address
          in brackets and a port from 1 to 65535, e.g. "0.0.0.0:80" or "[::]:80"; got "${cfg.listen}".
        '';
      }
      {
        assertion = cfg.healthInterval * 2 < cfg.watchdogSec;
        message = ''
          services.ami-agent.healthInterval (${toString cfg.healthInterval} s) must be under half of
          services.ami-agent.watchdogSec (${toString cfg.watchdogSec} s), or systemd kills a healthy agent.
        '';
      }
      {
        assertion = lib.all driftSourceValid cfg.driftSources;
        message = ''
          services.ami-agent.driftSources entries must be ntp://HOST[:PORT], http://HOST[/PATH]
          or https://HOST[/PATH]; got ${builtins.toJSON cfg.driftSources}.
        '';
      }
      {
        assertion = lib.intersectLists ownedKeys (lib.attrNames cfg.settings) == [ ];
        message = ''
          services.ami-agent.settings must not set ${
            lib.concatStringsSep ", " (lib.intersectLists ownedKeys (lib.attrNames cfg.settings))
          }: use services.ami-agent.{content,manifest,listen,healthInterval,driftSources}.
        '';
      }
      {
        assertion = lib.subtractLists passThroughKeys (lib.attrNames cfg.settings) == [ ];
        message = ''
          services.ami-agent.settings has keys the agent does not know:
          ${lib.concatStringsSep ", " (lib.subtractLists passThroughKeys (lib.attrNames cfg.settings))}
          (known: ${lib.concatStringsSep ", " passThroughKeys}).
        '';
      }
    ];

    # SSM Run Command scripts run with a bare PATH: they call
    # /run/current-system/sw/bin/ami-agent check.
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts = lib.optional (cfg.openFirewall && listenValid) port;

    systemd.services.ami-agent = {
      description = "amictl release server (ami-agent)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];

      # Restart=always below; this only stops a crash loop from spinning forever.
      startLimitIntervalSec = 300;
      startLimitBurst = 10;

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        WatchdogSec = cfg.watchdogSec;
        # A hung agent gets SIGABRT from the watchdog; do not wait the default 90 s for it.
        TimeoutAbortSec = "10s";
        LimitNOFILE = openFileLimit;
        Restart = "always";
        RestartSec = "2s";

        # A fresh copy of the release at every start: remove whatever the last run left
        # (healed or tampered files, files of an older release), then copy the read-only
        # store content with modes the service user can rewrite (0644/0755 under the umask).
        ExecStartPre = [
          "${coreutils}/rm -rf --one-file-system -- ${servedDir}"
          "${coreutils}/cp -R --dereference --no-preserve=mode,ownership -T -- ${cfg.content} ${servedDir}"
        ];
        ExecStart = "${cfg.package}/bin/ami-agent serve --config ${configFile}";

        DynamicUser = true;
        StateDirectory = "ami-agent";
        StateDirectoryMode = "0755";
        UMask = "0022";

        # Port 80 without root, and nothing else.
        AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ];
        CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ];
        NoNewPrivileges = true;

        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RemoveIPC = true;

        # AF_UNIX for the sd_notify socket (readiness and watchdog).
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
