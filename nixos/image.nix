# How the AMI's bytes are made.
#
# nixpkgs' amazon image script calls make-disk-image.nix with a copy of nixpkgs as a channel
# and without asking for a bit-for-bit reproducible file system. We call the same builder
# with the same partition layout and file system, and:
# - no channel (`copyChannel = false`): the system comes from the flake, and the nixpkgs
#   source would be most of the image;
# - `deterministic` (fixed disk, partition and file system UUIDs), and `reproducible` only
#   if the pinned make-disk-image.nix declares it. Newer nixpkgs have one (the file system
#   populated with mke2fs in a fixed order, with fixed times), but that it exists at the
#   26.05 pin has not been confirmed against the file at the pinned revision. So no
#   bit-for-bit promise is made: `nix build .#ami --rebuild` tells whether two builds
#   agree, and the content address amictl publishes under is computed from the bytes
#   built, whatever they are.
#
# The output keeps the layout of upstream's: the image file, nix-support/hydra-build-products
# and nix-support/image-info.json (label, boot_mode, system, logical_bytes as a string, file,
# disks.root), which `amictl` reads to register the AMI.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  cfg = config.amazonImage;
  makeDiskImage = import (modulesPath + "/../lib/make-disk-image.nix");

  # Ask for what the pinned builder offers; an argument it does not declare would be an
  # evaluation error.
  accepted = builtins.functionArgs makeDiskImage;
  reproducibility = lib.filterAttrs (name: _: accepted ? ${name}) {
    deterministic = true;
    reproducible = true;
  };

  bootMode = if config.ec2.efi then "uefi" else "legacy-bios";
  # Newer nixpkgs describe the RegisterImage call in the image; pass it on when present.
  registerImage = cfg.registerImage or null;
in
{
  assertions = [
    {
      assertion = cfg.format == "raw";
      message = "amazonImage.format must be \"raw\": amictl uploads the image with the EBS direct APIs";
    }
    {
      assertion = !config.ec2.zfs.enable;
      message = "the amictl image builder makes ext4 images only (ec2.zfs.enable must be false)";
    }
  ];

  # make-disk-image.nix names raw images <baseName>.img.
  image.extension = lib.mkForce "img";

  system.build.amazonImage = lib.mkForce (
    makeDiskImage (
      {
        inherit lib config pkgs;
        inherit (cfg) contents format;
        inherit (config.image) baseName;
        name = config.image.baseName;
        fsType = "ext4";
        partitionTableType = if config.ec2.efi then "efi" else "legacy+gpt";
        inherit (config.virtualisation) diskSize;
        copyChannel = false;
        postVM = ''
          mkdir -p $out/nix-support
          echo "file ${cfg.format} $diskImage" >> $out/nix-support/hydra-build-products
          ${lib.getExe pkgs.jq} -n \
            --arg release_label ${lib.escapeShellArg config.system.nixos.version} \
            --arg boot_mode ${bootMode} \
            --arg system ${lib.escapeShellArg pkgs.stdenv.hostPlatform.system} \
            --arg logical_bytes "$(stat -c %s "$diskImage")" \
            --arg file "$diskImage" \
            --argjson register_image ${lib.escapeShellArg (builtins.toJSON registerImage)} \
            '{
              "label": $release_label,
              "boot_mode": $boot_mode,
              "system": $system,
              "logical_bytes": $logical_bytes,
              "file": $file,
              "disks": { "root": { "logical_bytes": $logical_bytes, "file": $file } }
            }
            + (if $register_image == null then {} else { "registerImage": $register_image } end)' \
            > $out/nix-support/image-info.json
        '';
      }
      // reproducibility
    )
  );
}
