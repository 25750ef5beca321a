# The EC2 image: nixpkgs' amazon image plus the amictl appliance, with the EC2 entry points
# we do not want (SSH keys, user data as NixOS configuration) turned off.
#
# The agent and site packages come from the amictl flake's overlay (`pkgs.ami-agent`,
# `pkgs.amictl-site`), which the flake's `nixosModules.ami` adds; see flake.nix.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:
{
  imports = [
    # Builds `system.build.amazonImage` (and `system.build.image`) and imports
    # nixos/modules/virtualisation/amazon-image.nix: ENA/NVMe drivers, serial console,
    # growpart, the SSM agent, time from 169.254.169.123.
    (modulesPath + "/../maintainers/scripts/ec2/amazon-image.nix")
    ./appliance.nix
    ./image.nix
    # The host name from instance metadata (see there why neither upstream's unit nor
    # dhcpcd sets it in this image).
    ./ec2-hostname.nix
  ];

  # amictl uploads the snapshot with the EBS direct APIs, which take raw disk images only.
  amazonImage.format = "raw";

  # e.g. amictl-26.05.20260801.02e0898-x86_64-linux.img: the NixOS release and nixpkgs
  # revision in the name, the architecture at the end.
  image.baseName = "amictl-${config.system.nixos.version}-${pkgs.stdenv.hostPlatform.system}";

  # Size the disk to the closure (plus upstream's default headroom) instead of the 4 GiB
  # default: less to upload and snapshot. growpart resizes the root partition and file
  # system to the EBS volume at first boot.
  virtualisation.diskSize = lib.mkDefault "auto";

  # No key pairs: `apply-ec2-data` copies the launch key pair into root's
  # authorized_keys, from what `fetch-ec2-metadata` downloads (key, user data, host name).
  # Neither has a use without SSH. networking.hostName stays "" (the amazon image's
  # default), and ./ec2-hostname.nix sets the EC2 private DNS name at boot.
  systemd.services.fetch-ec2-metadata.enable = false;
  systemd.services.apply-ec2-data.enable = false;
  # Prints SSH host keys to the console; there are none.
  systemd.services.print-host-key.enable = false;
  # amazon-init would run `nixos-rebuild switch` with the user data as configuration.nix:
  # an instance must stay the image it booted.
  virtualisation.amazon-init.enable = false;

  # Kept from the amazon image, checked here so a change upstream cannot drop them silently.
  assertions = [
    {
      assertion = config.services.amazon-ssm-agent.enable;
      message = "the AMI needs the SSM agent: it is the only way to run commands on an instance";
    }
    {
      assertion = lib.elem "169.254.169.123" config.networking.timeServers;
      message = "the AMI must take its time from the Amazon Time Sync Service (169.254.169.123)";
    }
    {
      assertion = config.boot.growPartition && config.fileSystems."/".autoResize;
      message = "the AMI must grow its root partition and file system to the EBS volume";
    }
    {
      assertion = config.systemd.services ? ec2-hostname;
      message = "the AMI must take its host name from instance metadata (leave networking.hostName empty)";
    }
    {
      assertion = !config.services.openssh.enable;
      message = "the AMI must not run an SSH daemon";
    }
  ];

  system.stateVersion = "26.05";
}
