# The host name of an instance: its EC2 private DNS name (ip-10-0-1-23.ec2.internal, or a
# resource name such as i-0123456789abcdef0.ec2.internal where the subnet uses those), as
# the console, SSM and the agent's logs show it.
#
# Upstream sets it in apply-ec2-data, which ./ami.nix turns off along with
# fetch-ec2-metadata (they also install the launch key pair and download the user data).
# dhcpcd does not set it either: at 26.05 `networking.dhcpcd.setHostname` goes through
# hostnamed and needs polkit, which this image leaves off. So this unit asks the instance
# metadata service (IMDSv2, the only version the AMI allows) once per boot, as root.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.amictl.ec2Hostname;
in
{
  options.amictl.ec2Hostname.metadataUrl = lib.mkOption {
    type = lib.types.str;
    default = "http://169.254.169.254";
    internal = true;
    description = "The instance metadata service; the VM test points it at a stand-in.";
  };

  # A host name set in the configuration wins, as upstream's apply-ec2-data lets it.
  config = lib.mkIf (config.networking.hostName == "") {
    systemd.services.ec2-hostname = {
      description = "Set the host name from EC2 instance metadata";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      path = [
        pkgs.curl
        pkgs.nettools
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = ''
        imds=${lib.escapeShellArg cfg.metadataUrl}
        # The service answers within milliseconds once the interface is up; 30 tries a
        # second apart cover a slow DHCP lease.
        token=$(curl --fail --silent --show-error --retry 30 --retry-delay 1 --retry-connrefused \
          --max-time 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$imds/latest/api/token")
        name=$(curl --fail --silent --show-error --retry 5 --retry-delay 1 --max-time 5 \
          -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/local-hostname")
        # The kernel takes at most 64 bytes; a DNS name is letters, digits, hyphens and dots.
        case "$name" in
          "" | -* | *[!A-Za-z0-9.-]*)
            echo "the metadata service gave no usable host name: '$name'" >&2
            exit 1
            ;;
        esac
        if [ "''${#name}" -gt 64 ]; then
          echo "host name longer than 64 bytes: $name" >&2
          exit 1
        fi
        hostname "$name"
        echo "host name: $name"
      '';
    };
  };
}
