"""`edge-runtime probe`: measure this machine and print or write its device profile.

    edge-runtime probe                                   # print the profile (TOML) for this machine
    edge-runtime probe --name "my board" --out ~/profiles/my-board.toml --peer 10.0.0.3:29500 \
        --link-rate-mbit 300 --disk-dir /data
    edge-runtime probe --json --quick                    # the measurements, one JSON object

The written file loads like a bundled profile: `edge-runtime plan --device ~/profiles/my-board.toml`,
`edge-runtime tp prepare --weights-from a.toml,b.toml`, or by name once its folder is in
EDGEFOLD_PROFILE_PATH. What is measured and what is not (power, link rate): see devices/probe.py.
Exit status: 0 done, 2 bad arguments or a failed measurement (an unreachable peer, an unwritable folder).
"""
import json
import sys
from pathlib import Path

POWER = ("idle_w", "active_w", "radio_tx_w")


def add_parser(commands) -> None:
    sub = commands.add_parser("probe", help="measure this machine (GEMM, memory, disk, peer RTT) into a profile")
    sub.add_argument("--out", help="write the profile to this .toml file (default: print it)")
    sub.add_argument("--name", help="the profile's name (default: this host's name)")
    sub.add_argument("--peer", help="HOST:PORT of a peer with a listening TCP port: measure the RTT to it")
    sub.add_argument("--link-rate-mbit", type=float,
                     help="the peer link's rate, not measured (default 100, said so in the file)")
    sub.add_argument("--timeout-s", type=float, default=1.0, help="per TCP connect to --peer")
    sub.add_argument("--disk-dir", help="where the temporary test file is written and read back "
                                        "(default: the edgefold cache, $EDGEFOLD_CACHE or ~/.cache/edgefold)")
    sub.add_argument("--defaults-from", default="raspberry-pi-4",
                     help="profile whose power figures (and links, without --peer) are copied, marked not measured")
    for key in POWER:
        sub.add_argument(f"--{key.replace('_', '-')}", type=float, help=f"{key} in watts (not measurable here)")
    sub.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    sub.add_argument("--quick", action="store_true", help="small sizes (seconds less; for tests)")


def run(args) -> int:
    from devices.probe import measure, profile_toml          # numpy and psutil: loaded only when probing
    from devices.profiles import load_profile

    try:
        if args.out and Path(args.out).suffix != ".toml":
            raise ValueError(f"--out {args.out}: the file name must end in .toml (load_profile needs it)")
        if args.link_rate_mbit is not None and not args.link_rate_mbit > 0:
            raise ValueError(f"--link-rate-mbit must be > 0, got {args.link_rate_mbit}")
        power = {key: getattr(args, key) for key in POWER}
        for key, value in power.items():
            if value is not None and not (value > 0 or (key == "radio_tx_w" and value == 0)):
                raise ValueError(f"--{key.replace('_', '-')} must be a number > 0, got {value}")
        load_profile(args.defaults_from)                      # a bad name fails before the measuring
        m = measure(args.quick, args.disk_dir, args.peer, args.timeout_s)
        text = profile_toml(m, args.name, args.link_rate_mbit, args.defaults_from, power)
        if args.out:
            out = Path(args.out).expanduser()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            load_profile(out)                                 # what was written loads back
    except (OSError, ValueError) as err:                      # ProbeError, ProfileError, bad flags
        print(f"edge-runtime probe: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(m))
    elif not args.out:
        print(text, end="")
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
