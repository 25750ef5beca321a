#!/usr/bin/env python3
"""Runs a moto server on loopback for bench/publish.sh, until SIGTERM or SIGINT.

moto's StartSnapshot answers BlockSize 512, while AWS answers 524288 (512 KiB). coldsnap
sizes its blocks from that answer, so without a fix it would send 1024 times as many
requests as it sends to AWS. This launcher patches moto's EBS snapshot model so that
StartSnapshot (and ListSnapshotBlocks, ListChangedBlocks) answer 524288, as AWS does.
The patch lives in this benchmark only; amictl always uses the documented 524288.

Usage:
  moto_launcher.py [--host 127.0.0.1] [--port 0] [--port-file PATH]
      Serves. --port 0 picks a free port. The port in use is printed on stdout as
      "PORT <n>" once the server has answered a first request (EC2 and EBS are loaded
      then, so the first timed upload does not pay for moto's imports), and written to
      --port-file if one is given.
  moto_launcher.py blocks --port N ID
      Asks a running server how many blocks a snapshot holds, to check that an upload
      really happened. ID is a snapshot id, or an AMI id (the snapshot its
      amictl:snapshot-id tag names, else its root snapshot). Prints
      "<snapshot-id> <blocks> <block-size>".
"""

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading

EBS_BLOCK_SIZE = 524288


def patch_block_size() -> None:
    from moto.ebs import models

    original_init = models.EBSSnapshot.__init__
    if getattr(original_init, "_bench_patched", False):
        return

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        self.block_size = EBS_BLOCK_SIZE

    init._bench_patched = True  # type: ignore[attr-defined]
    models.EBSSnapshot.__init__ = init


def client(service: str, port: int):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}, proxies={}),
    )


def serve(args: argparse.Namespace) -> int:
    # The development server logs every request; thousands of block puts would flood
    # the log and cost the server CPU time.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    patch_block_size()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    # One request through the whole stack: loads the EC2 backend and the dispatcher.
    client("ec2", port).describe_snapshots(OwnerIds=["self"])

    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"PORT {port}", flush=True)

    while not stop.wait(3600):
        pass
    server.stop()
    return 0


def blocks(args: argparse.Namespace) -> int:
    snapshot_id = args.id
    if snapshot_id.startswith("ami-"):
        images = client("ec2", args.port).describe_images(ImageIds=[snapshot_id])["Images"]
        # moto's RegisterImage ignores the block device mapping it is given and makes up
        # a snapshot of its own, so the AMI's tag names the uploaded snapshot.
        snaps = [
            t["Value"]
            for i in images
            for t in i.get("Tags", [])
            if t["Key"] == "amictl:snapshot-id"
        ] or [
            m["Ebs"]["SnapshotId"]
            for i in images
            for m in i.get("BlockDeviceMappings", [])
            if m.get("Ebs", {}).get("SnapshotId")
        ]
        if len(snaps) != 1:
            print(f"{snapshot_id}: expected one snapshot, found {snaps}", file=sys.stderr)
            return 1
        snapshot_id = snaps[0]
    ebs = client("ebs", args.port)
    count, size, token = 0, 0, None
    for _ in range(100_000):  # bounded; moto answers everything in one page
        kw = {"SnapshotId": snapshot_id}
        if token:
            kw["NextToken"] = token
        page = ebs.list_snapshot_blocks(**kw)
        count += len(page.get("Blocks", []))
        size = page.get("BlockSize", size)
        token = page.get("NextToken")
        if not token:
            break
    state = client("ec2", args.port).describe_snapshots(SnapshotIds=[snapshot_id])
    status = state["Snapshots"][0]["State"] if state["Snapshots"] else "missing"
    print(f"{snapshot_id} {count} {size} {status}")
    return 0


def main() -> int:
    argv = sys.argv[1:]
    mode = "serve"
    if argv and argv[0] in ("serve", "blocks"):
        mode, argv = argv[0], argv[1:]
    parser = argparse.ArgumentParser(
        prog=f"moto_launcher.py {mode}", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    if mode == "serve":
        parser.add_argument("--port-file")
    else:
        parser.add_argument("id")
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error(f"--host must be a loopback address, got {args.host}")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(var, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    return serve(args) if mode == "serve" else blocks(args)


if __name__ == "__main__":
    sys.exit(main())
