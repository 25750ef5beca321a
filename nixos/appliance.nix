# What every amictl machine is, wherever it boots: the agent serving the release on port 80,
# nothing else listening, no way in but the cloud's own agent (added by ./ami.nix on EC2),
# and a closure small enough to upload fast. Nothing here depends on EC2, so the VM tests
# boot this profile as it is (nixos/tests/appliance.nix).
{ lib, modulesPath, ... }:
{
  imports = [
    # Upstream's "no documentation, no default tools, no X" defaults (all mkDefault).
    (modulesPath + "/profiles/minimal.nix")
    ./agent.nix
  ];

  services.ami-agent.enable = true;

  # No interactive way in: no SSH daemon (the amazon image enables one with a plain
  # definition, hence mkForce) and therefore no key pairs. Operators use SSM.
  services.openssh.enable = lib.mkForce false;

  # The firewall stays on; the agent's module opens its own port (80) and nothing else does.
  networking.firewall.enable = true;

  # A small closure: no manuals, no channel (the system comes from the flake, and a
  # channel copy of nixpkgs would double the image), no nixos-rebuild/nixos-option (an
  # instance is replaced by a new image, never rebuilt in place).
  documentation.enable = false;
  documentation.nixos.enable = false;
  documentation.man.enable = false;
  nix.channel.enable = false;
  system.disableInstallerTools = true;
  environment.defaultPackages = [ ];
  programs.command-not-found.enable = false;
  boot.enableContainers = false;
}
