{
  description = "amictl: a reproducible NixOS EC2 image that serves a release, and the tools to ship it";

  # The only input. nixos-26.05 needs Nix 2.18 or newer.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = lib.genAttrs systems;
      # "x86_64-linux" -> "x86_64", the suffix of the nixosConfigurations.
      archOf = system: lib.head (lib.splitString "-" system);

      # nixpkgs with this flake's packages (see `overlays.default`).
      pkgsFor =
        system:
        import nixpkgs {
          inherit system;
          overlays = [ self.overlays.default ];
        };

      # The release the site shows and the manifest records: this commit and the NixOS
      # release, e.g. "1a2b3c4-nixos-26.05". A dirty tree has no revision.
      releaseVersion = "${self.shortRev or "dirty"}-nixos-${lib.trivial.release}";

      # How the Rust workspace is built: the files it reads, the profile, and each package's
      # and check's cargo flags, kept in Cargo.toml's [workspace.metadata.nix] so that
      # `.ci/nix-rust` runs the very same cargo commands without Nix.
      rustBuild = (lib.importTOML ./Cargo.toml).workspace.metadata.nix;

      # What the Rust build reads, and nothing else, so that editing the README or the
      # Nix files does not rebuild the binaries.
      rustSource = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions (map (path: ./. + "/${path}") rustBuild.source);
      };

      # The source the site publishes as source.zip: the flake's source (for a git flake,
      # the tracked files) without build outputs, should they be there (a `path:` flake).
      publishedSource = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.difference ./. (
          lib.fileset.unions [
            (lib.fileset.maybeMissing ./target)
            (lib.fileset.fileFilter (
              file: file.type == "symlink" && (file.name == "result" || lib.hasPrefix "result-" file.name)
            ) ./.)
          ]
        );
      };

      cargoVersion = (lib.importTOML ./Cargo.toml).workspace.package.version;

      # One workspace, one Cargo.lock: each package (or check) builds and tests what its
      # entry in [workspace.metadata.nix] names. Tests that need moto or AWS skip themselves
      # (no AWS_ENDPOINT_URL, no moto_server in the sandbox); the rest use loopback only.
      workspaceBuild =
        pkgs: unit: attrs:
        pkgs.rustPlatform.buildRustPackage (
          {
            version = cargoVersion;
            src = rustSource;
            cargoLock.lockFile = ./Cargo.lock;
            buildType = rustBuild.build-type;
            cargoBuildFlags = unit.build-flags;
            cargoTestFlags = unit.test-flags;
          }
          // attrs
        );

      workspaceMember =
        pkgs:
        {
          pname,
          mainProgram,
          description,
          extraAttrs ? { },
        }:
        let
          unit = rustBuild.packages.${pname};
          # A package's wrapper variables name other packages' binaries (amictl -> ami-agent).
          wrap = unit.wrap or { };
        in
        workspaceBuild pkgs unit (
          {
            inherit pname;
            nativeBuildInputs = lib.optional (wrap != { }) pkgs.makeWrapper;
            postInstall = lib.optionalString (wrap != { }) ''
              wrapProgram $out/bin/${mainProgram} ${
                lib.concatStringsSep " " (
                  lib.mapAttrsToList (
                    var: ref: "--set-default ${var} ${lib.getExe' pkgs.${ref.package} ref.exe}"
                  ) wrap
                )
              }
            '';
            meta = {
              inherit description mainProgram;
              license = lib.licenses.asl20;
              platforms = lib.platforms.linux;
            };
          }
          // extraAttrs
        );

      # The tests in tests/ (amictl driving ami-agent: the local fleet end to end), run in
      # the sandbox against the packages themselves, wrapper included. Its output only says
      # that they passed.
      crossCrateTests =
        pkgs:
        let
          unit = rustBuild.checks.cross-crate;
        in
        workspaceBuild pkgs unit {
          pname = "amictl-cross-crate-tests";
          preCheck = lib.concatStrings (
            lib.mapAttrsToList (
              var: ref: "export ${var}=${lib.getExe' pkgs.${ref.package} ref.exe}\n"
            ) unit.binaries
          );
          installPhase = ''
            runHook preInstall
            touch $out
            runHook postInstall
          '';
        };
    in
    {
      # The packages, built with whatever nixpkgs they are applied to: NixOS configurations
      # get them through this overlay, so they follow the system's pkgs (its platform, its
      # overrides) instead of a second, fixed nixpkgs.
      overlays.default = final: _prev: {
        ami-agent = workspaceMember final {
          pname = "ami-agent";
          mainProgram = "ami-agent";
          description = "Serves an amictl release, heals it, reports drift and answers health checks";
        };

        amictl = workspaceMember final {
          pname = "amictl";
          mainProgram = "amictl";
          description = "Publish NixOS images as AMIs and roll fleets onto them";
          # The archive tests compare git-listed and walked trees.
          extraAttrs.nativeCheckInputs = [ final.git ];
        };

        amictl-site = final.callPackage ./site {
          source = publishedSource;
          version = releaseVersion;
        };
      };

      packages = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
          agent = pkgs.ami-agent;
          site = pkgs.amictl-site;
        in
        {
          inherit agent site;
          inherit (pkgs) amictl;
          default = pkgs.amictl;

          # The raw EC2 image: result/<name>.img and result/nix-support/image-info.json.
          ami = self.nixosConfigurations."ami-${archOf system}".config.system.build.amazonImage;

          # The same agent and site for local runs and CI: `docker load < result`. The site is
          # served from the read-only store path: it cannot drift, so there is nothing to
          # heal in place; a failing container is replaced by its orchestrator.
          container = pkgs.dockerTools.buildLayeredImage {
            name = "amictl-agent";
            tag = releaseVersion;
            config = {
              Entrypoint = [
                (lib.getExe agent)
                "serve"
                "--root"
                "${site}/www"
                "--manifest"
                "${site}/manifest.json"
                "--listen"
                "0.0.0.0:8080"
              ];
              ExposedPorts."8080/tcp" = { };
              # nobody:nogroup; port 8080 needs no capability.
              User = "65534:65534";
            };
          };
        }
      );

      # Written as `{ imports = [ path ]; }`: `nix flake check` (before 2.9) rejects a bare
      # path, and importing by path lets the module system see that ./nixos/ami.nix, which
      # imports ./nixos/agent.nix too, brings the same module (no double declarations when
      # a configuration uses both).
      nixosModules.agent = {
        imports = [ ./nixos/agent.nix ];
      };

      # The EC2 image profile. The agent and site packages come in through the overlay rather
      # than specialArgs: the modules stay ordinary modules (pkgs.ami-agent, mkPackageOption)
      # that work in any configuration that applies the overlay, and the packages are built
      # by the configuration's own nixpkgs.
      nixosModules.ami = {
        imports = [ ./nixos/ami.nix ];
        nixpkgs.overlays = [ self.overlays.default ];
      };

      nixosConfigurations = lib.listToAttrs (
        map (
          system:
          lib.nameValuePair "ami-${archOf system}" (
            lib.nixosSystem {
              modules = [
                self.nixosModules.ami
                {
                  nixpkgs.hostPlatform = system;
                  # `nixos-version --configuration-revision` on an instance names the commit.
                  system.configurationRevision = self.rev or null;
                }
              ];
            }
          )
        ) systems
      );

      checks = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
          packages = lib.mapAttrs' (name: lib.nameValuePair "package-${name}") (
            removeAttrs self.packages.${system} [ "default" ]
          );
          # Every nixos/tests/*.nix is a VM test (a function of { self, ... } returning the
          # argument of runNixOSTest). The nodes use this flake's pkgs, overlay included.
          # They run on both architectures: the image ships for both, and an aarch64
          # builder (with KVM) is where the aarch64 agent gets booted before release.
          vmTests = lib.mapAttrs' (
            file: _:
            lib.nameValuePair "vm-${lib.removeSuffix ".nix" file}" (
              pkgs.testers.runNixOSTest (import (./nixos/tests + "/${file}") { inherit self; })
            )
          ) (lib.filterAttrs (file: type: type == "regular" && lib.hasSuffix ".nix" file) (builtins.readDir ./nixos/tests));
        in
        packages // vmTests // { cross-crate = crossCrateTests pkgs; }
      );

      devShells = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
          python = pkgs.python3.withPackages (
            ps:
            # moto_server for the AWS tests, cfn-lint for the CloudFormation templates.
            lib.optionals (ps ? moto) ([ ps.moto ] ++ (ps.moto.optional-dependencies.server or [ ]))
            ++ lib.optional (ps ? cfn-lint) ps.cfn-lint
          );
        in
        {
          default = pkgs.mkShell {
            packages = [
              pkgs.cargo
              pkgs.rustc
              pkgs.clippy
              pkgs.rustfmt
              pkgs.git
              python
              pkgs.nixfmt
            ];
          };
        }
      );

      # nixfmt is the RFC 166 formatter at this release (nixfmt-rfc-style is gone).
      formatter = forAllSystems (system: nixpkgs.legacyPackages.${system}.nixfmt);
    };
}
