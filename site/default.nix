# The release's static site, as the agent serves it:
#
#   $out/www/index.html          "Hello, world!", the version, a link to the source
#   $out/www/version.txt         the version, one line
#   $out/www/source.zip          `amictl archive` of the flake's source: deterministic
#   $out/www/source.zip.sha256   its sha256, in `sha256sum -c` format
#   $out/manifest.json           `ami-agent manifest` of www/: every file's size and sha256
#
# The manifest lives outside www/: it describes what is served, it is not served as a file.
{
  stdenvNoCC,
  amictl,
  ami-agent,
  # The source tree to publish (the flake's source, filtered in flake.nix).
  source,
  # The release version: the flake's short revision and the NixOS release.
  version,
}:
stdenvNoCC.mkDerivation {
  pname = "amictl-site";
  inherit version;

  nativeBuildInputs = [
    amictl
    ami-agent
  ];

  # Keep the tools' logs to warnings in the build log.
  AMICTL_LOG = "warn";
  AMI_AGENT_LOG = "warn";

  buildCommand = ''
    mkdir -p $out/www
    cd $out/www

    # Prints "<sha256>  source.zip", the line `sha256sum -c source.zip.sha256` checks.
    amictl archive --output source.zip ${source} > source.zip.sha256
    read -r sha256 _ < source.zip.sha256

    printf '%s\n' "$version" > version.txt
    substitute ${./index.html} index.html \
      --subst-var-by version "$version" \
      --subst-var-by sha256 "$sha256"

    ami-agent manifest $out/www --version "$version" > $out/manifest.json
  '';

  meta.description = "The amictl release's static site and its manifest";
}
