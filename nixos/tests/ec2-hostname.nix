# nixos/ec2-hostname.nix against a stand-in for the instance metadata service that, like
# the real one with IMDSv2 required, answers 401 to a request without a session token.
{ self, ... }:
{
  name = "amictl-ec2-hostname";

  nodes = {
    imds =
      { pkgs, ... }:
      {
        networking.firewall.allowedTCPPorts = [ 80 ];
        systemd.services.imds = {
          wantedBy = [ "multi-user.target" ];
          script = ''
            exec ${pkgs.python3}/bin/python3 ${pkgs.writeText "imds.py" ''
              import http.server

              TOKEN = "test-token"

              class Imds(http.server.BaseHTTPRequestHandler):
                  def answer(self, code, body=b""):
                      self.send_response(code)
                      self.send_header("Content-Length", str(len(body)))
                      self.end_headers()
                      self.wfile.write(body)

                  def do_PUT(self):
                      if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                          self.answer(200, TOKEN.encode())
                      else:
                          self.answer(400)

                  def do_GET(self):
                      if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                          self.answer(401)
                      elif self.path == "/latest/meta-data/local-hostname":
                          self.answer(200, b"ip-10-0-1-23.ec2.internal")
                      else:
                          self.answer(404)

              http.server.HTTPServer(("0.0.0.0", 80), Imds).serve_forever()
            ''}
          '';
        };
      };

    machine =
      { lib, ... }:
      {
        imports = [ ../ec2-hostname.nix ];
        # As on EC2 (the amazon image's default): no host name in the configuration.
        networking.hostName = lib.mkForce "";
        amictl.ec2Hostname.metadataUrl = "http://imds";
      };
  };

  testScript =
    { nodes, ... }:
    assert nodes.machine.systemd.services ? ec2-hostname;
    ''
      imds.wait_for_unit("imds.service")
      imds.wait_for_open_port(80)
      machine.start()
      machine.wait_for_unit("ec2-hostname.service")
      name = machine.succeed("hostname").strip()
      assert name == "ip-10-0-1-23.ec2.internal", f"host name {name!r}"
      machine.succeed("journalctl --unit ec2-hostname.service | grep -F 'host name: ip-10-0-1-23.ec2.internal'")
    '';
}
