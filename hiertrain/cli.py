"""The ``hiertrain`` command line: one console script, one subcommand per capability.

The parser is here; what each command does is :mod:`hiertrain.commands`'. Errors of hiertrain's own
kind and bad arguments print one line on stderr and exit non-zero; a command of an extra the
install lacks names the extra.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from hiertrain import commands
from hiertrain.bench import BENCHES
from hiertrain.errors import HiertrainError
from hiertrain.lab.emulation import PAPER_INTERPRETER

OPTIMIZERS = ("sgd", "adamw")  # hiertrain.train.optim.KINDS, which needs onnx: the CLI's parser does not

Handler = Callable[[argparse.Namespace], int]
EXTRA_OF = {"onnx": "device", "onnxruntime": "device", "mip": "planner", "amqtt": "broker", "matplotlib": "bench",
            "PIL": "data"}  # the extra that brings a module the core install lacks

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _batch(text: str) -> int:
    from hiertrain import MAX_BATCH

    value = _positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"batch {value} is over the limit of {MAX_BATCH}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not in 1..65535")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _positive_float(text: str) -> float:
    value = _nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def _dilation(text: str) -> float:
    value = _positive_float(text)
    if not 1.0 <= value <= 1000.0:
        raise argparse.ArgumentTypeError(f"{text} must be in 1..1000")
    return value


# -------------------------------------------------------------------------------------- demo


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hiertrain", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    init = sub.add_parser("init", help="a new job: configs and credentials for each machine, and a README of commands")
    init.add_argument("dir")
    init.add_argument("--job", help="the job's name (default: the directory's)")
    init.add_argument("--host", default="127.0.0.1", help="the edge server's address, as the other machines reach it")
    init.add_argument("--port", type=_port)
    init.add_argument("--bind", default="0.0.0.0", help="address the broker listens on")
    init.add_argument("--model", default="lenet5", type=_model, metavar="MODEL")
    init.add_argument("--batch", type=_batch, default=64, help="samples per iteration (a fleet's: of all devices)")
    init.add_argument("--devices", type=_positive_int, default=0, metavar="N",
                      help="a fleet of N devices, each with its own account, instead of one device")
    init.add_argument("--iterations", type=_positive_int, default=1000)
    init.add_argument("--lr", type=_positive_float, default=0.05)
    init.add_argument("--data", default="synthetic", help="the device's data set: synthetic, cifar10, tiny-imagenet, "
                      "npz, images (a folder of class folders), csv")
    init.add_argument("--data-path", help="where the data set is on the device")
    init.add_argument("--bw-device-edge", type=_positive_float, default=5.0, metavar="MBPS",
                      help="link rate the planner starts from (telemetry then measures the real one)")
    init.add_argument("--bw-edge-cloud", type=_positive_float, default=5.0, metavar="MBPS")
    init.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    init.set_defaults(handler=commands.cmd_init)

    demo = sub.add_parser("demo", help="broker, planner, device, edge and cloud on this machine: a short run")
    demo.add_argument("--model", default="lenet5", type=_model, metavar="MODEL")
    demo.add_argument("--data", metavar="PATH", help="your data instead of the synthetic set: an .npz (x, y), "
                      "a .csv (label column: label/class/target/y or the last), or a folder of class folders")
    demo.add_argument("--devices", type=_positive_int, metavar="N",
                      help="a fleet: N enrolled devices (Pi 3-, Pi 4-, Jetson-class) on one edge and a cloud")
    demo.add_argument("--iterations", type=_positive_int, default=40)
    demo.add_argument("--batch", type=_batch, default=32)
    demo.add_argument("--lr", type=_positive_float, default=0.05)
    demo.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="sgd (the paper's) or adamw")
    demo.add_argument("--bw-device-edge", type=_positive_float, default=5.0, metavar="MBPS",
                      help="link rate the planner starts from (telemetry then measures the real one)")
    demo.add_argument("--bw-edge-cloud", type=_positive_float, default=1.5, metavar="MBPS")
    demo.add_argument("--device-quota", type=_positive_float, default=0.15, metavar="CORES",
                      help="emulate a slow device with a CPU quota (root only)")
    demo.add_argument("--no-quota", action="store_true")
    demo.add_argument("--workdir", help="keep the run's files here (default: a temporary directory)")
    demo.add_argument("--keep", action="store_true", help="do not delete the work directory")
    demo.add_argument("--dashboard", type=_port, nargs="?", const=8080, metavar="PORT",
                      help="serve the live dashboard on localhost while the demo runs (default port 8080)")
    demo.set_defaults(handler=commands.cmd_demo)

    broker = sub.add_parser("broker", help="the MQTT broker on the edge server").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    init = broker.add_parser("init", help="write config, password file, ACL and credentials")
    init.add_argument("--dir", required=True)
    init.add_argument("--host", default="127.0.0.1", help="address the tiers use to reach the broker")
    init.add_argument("--port", type=_port)
    init.add_argument("--bind", default="0.0.0.0", help="address the broker listens on")
    init.add_argument("--max-packet-mb", type=_positive_int, default=16)
    init.add_argument("--job", help="bind every account to this job (recommended; default: any job)")
    init.add_argument("--tls-cert")
    init.add_argument("--tls-key")
    init.add_argument("--tls-ca")
    init.add_argument("--force", action="store_true", help="replace existing accounts")
    init.set_defaults(handler=commands.cmd_broker_init)
    start = broker.add_parser("start", help="run the broker in the foreground")
    start.add_argument("--dir", required=True)
    start.add_argument("--port", type=_port)
    start.add_argument("--embedded", action="store_true", help="run the pure-Python amqtt broker")
    start.set_defaults(handler=commands.cmd_broker_start)
    add = broker.add_parser("add-device", help="enrol a device: its own account, credentials file and ACL lines")
    add.add_argument("name", help="the device's name (a-z 0-9 _ -), e.g. pi3-greenhouse")
    add.add_argument("--dir", required=True)
    add.set_defaults(handler=commands.cmd_broker_device)
    rm = broker.add_parser("remove-device", help="withdraw an enrolled device's account")
    rm.add_argument("name")
    rm.add_argument("--dir", required=True)
    rm.set_defaults(handler=commands.cmd_broker_device)
    site = broker.add_parser("add-site", help="on the cloud's broker of a hierarchical job: an edge site's bridge "
                                              "account, which carries only the site's model up and the average down")
    site.add_argument("--site", required=True, help="the edge site's name (a-z 0-9 _ -), e.g. lab1")
    site.add_argument("--dir", required=True)
    site.set_defaults(handler=commands.cmd_broker_site)
    bridge = broker.add_parser("bridge", help="on an edge site's broker: bridge its sync topics to the cloud's broker")
    bridge.add_argument("--site", required=True, help="this site's name, as add-site was given it")
    bridge.add_argument("--to", required=True, type=Path, help="the credentials file add-site wrote "
                        "(bridge-<site>.json, from the cloud's broker directory)")
    bridge.add_argument("--dir", required=True)
    bridge.set_defaults(handler=commands.cmd_broker_site)
    svc = broker.add_parser("install-service", help="write a systemd unit for the broker")
    svc.add_argument("--dir", required=True)
    svc.add_argument("--unit-dir", default="/etc/systemd/system")
    svc.add_argument("--user", help="the unprivileged user to run as (default: the directory's owner; never root)")
    svc.set_defaults(handler=commands.cmd_broker_install_service)

    schedule = sub.add_parser("schedule", help="the planner's schedule topic").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    watch = schedule.add_parser("watch", help="print each schedule as it arrives")
    watch.add_argument("--config", required=True)
    watch.add_argument("--count", type=_positive_int, help="exit after this many schedules")
    watch.add_argument("--timeout", type=_nonneg_float, help="exit 1 if nothing arrives for this long")
    watch.add_argument("--json", action="store_true", help="one JSON object per schedule instead of a table")
    watch.set_defaults(handler=commands.cmd_schedule_watch)

    board = sub.add_parser("dashboard", help="a job, its plan and every device, live in a browser (read-only)")
    board.add_argument("--config", required=True, help="a config with the observer's credentials (never a tier's)")
    board.add_argument("--port", type=_port, default=8080)
    board.add_argument("--bind", default="127.0.0.1", help="the address to serve on (default: localhost only; "
                       "any other needs --cert and --key, and asks for the observer's password)")
    board.add_argument("--cert", type=Path, help="TLS certificate (PEM)")
    board.add_argument("--key", type=Path, help="TLS private key (PEM)")
    board.set_defaults(handler=commands.cmd_dashboard)

    prof = sub.add_parser("profile", help="measure a hiertrain-profile/1 for one tier on this machine")
    prof.add_argument("--model", required=True, type=_model, metavar="MODEL")
    prof.add_argument("--batch", type=_batch, required=True)
    prof.add_argument("--out", required=True)
    prof.add_argument("--tier", required=True, choices=["device", "edge", "cloud"],
                      help="the tier this machine is (the entry to write)")
    prof.add_argument("--merge", action="store_true", help="keep the other tiers already in --out")
    prof.add_argument("--threads", type=_positive_int, default=0, help="ORT intra-op threads (default: all cores)")
    prof.add_argument("--cpu-quota", type=_positive_float, metavar="CORES",
                      help="emulate a slower machine: a cgroup CPU quota in cores, e.g. 0.2 (root)")
    prof.add_argument("--kernel-dilation", type=_dilation, default=1.0, metavar="F",
                      help="emulate slower kernels than the quota gives: every kernel run stretched F times (>= 1)")
    prof.add_argument("--segments", metavar="DIR", help="a `hiertrain segments build` directory: what a tier "
                      "without the gradient builder (plain onnxruntime, a Raspberry Pi) profiles with")
    prof.add_argument("--repeat", type=_positive_int, default=7)
    prof.add_argument("--warmup", type=_positive_int, default=2)
    prof.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    prof.add_argument("--sample-dtype", choices=["uint8", "float32"],
                      help="how the data stores a sample, so how it travels (default: uint8 for images, else float32)")
    prof.set_defaults(handler=commands.cmd_profile)

    segs = sub.add_parser("segments", help="built training segments (graphs) for runners without a builder"
                          ).add_subparsers(dest="action", required=True, parser_class=_Parser)
    sb = segs.add_parser("build", help="build every segment of a model into a directory with a manifest")
    sb.add_argument("--model", required=True, type=_model, metavar="MODEL")
    sb.add_argument("--out", required=True, help="directory to write (copy it to the device; [runtime] segments)")
    sb.set_defaults(handler=commands.cmd_segments_build)

    model = sub.add_parser("model", help="your own model: check an ONNX file, export trained weights into it"
                           ).add_subparsers(dest="action", required=True, parser_class=_Parser)
    mi = model.add_parser("import", help="find the units and cut points of an ONNX model and check every op")
    mi.add_argument("file", help="an ONNX classifier: one float input [N, ...], logits [N, classes] out")
    mi.add_argument("--json", action="store_true", help="print one JSON object")
    mi.add_argument("--no-check", action="store_true", help="skip building the training graph")
    mi.set_defaults(handler=commands.cmd_model_import)
    me = model.add_parser("export", help="the ONNX file with a checkpoint's trained weights")
    me.add_argument("--model", required=True, type=_model, metavar="FILE.onnx")
    me.add_argument("--checkpoint", required=True, help="a checkpoint directory (the newest checkpoint in it)")
    me.add_argument("--out", required=True)
    me.set_defaults(handler=commands.cmd_model_export)

    ev = sub.add_parser("evaluate", help="held-out accuracy and loss of worker_o's newest checkpoint")
    ev.add_argument("--config", required=True, help="a tier config: its [train] model, [data] and [checkpoint] dir")
    ev.add_argument("--checkpoint", help="the checkpoint directory (default: the config's [checkpoint] dir)")
    ev.set_defaults(handler=commands.cmd_evaluate)

    plan = sub.add_parser("plan", help="one planning decision from a profile and bandwidths")
    plan.add_argument("--profile", required=True, action="append",
                      help="hiertrain-profile/1 JSON; repeat it to merge the files of separate machines "
                           "(later files add or replace tiers)")
    plan.add_argument("--bw-device-edge", type=_positive_float, required=True, metavar="MBPS")
    plan.add_argument("--bw-edge-cloud", type=_positive_float, required=True, metavar="MBPS")
    plan.add_argument("--batch", type=_batch, required=True)
    plan.add_argument("--policy", default="hiertrain",
                      choices=["hiertrain", "all-device", "all-edge", "all-cloud", "jointdnn", "jointdnn+", "jalad"])
    plan.add_argument("--cost-model", default="paper", choices=["paper", "calibrated"])
    plan.add_argument("--solver", default="exact", choices=["exact", "milp"],
                      help="exact: structured branch and bound (default); milp: one python-mip MILP per mapping")
    plan.add_argument("--objective", default="time", choices=["time", "energy", "budget"],
                      help="time: the least seconds per step (default); energy: the least joules within --deadline; "
                           "budget: the least seconds with the device within --energy-budget(-w)")
    plan.add_argument("--deadline", type=_positive_float, metavar="S", help="energy: the most seconds per step")
    plan.add_argument("--energy-budget", type=_positive_float, metavar="J",
                      help="budget: the most joules the device may spend per step")
    plan.add_argument("--energy-budget-w", type=_positive_float, metavar="W",
                      help="budget: the most watts the device may draw on average (its watt-hours per hour); "
                           "the step is paced to keep it")
    plan.add_argument("--energy-scope", default="devices", choices=["devices", "all"],
                      help="energy: minimise the device's joules (default) or every machine's")
    plan.add_argument("--power", action="append", default=[], metavar="TIER=CLASS",
                      help="a tier's power model: pi3, pi4, pi5, jetson or server (default: the profile's "
                           "\"power\", else device=pi4, edge and cloud server); repeat per tier")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(handler=commands.cmd_plan)

    pf = sub.add_parser("plan-fleet", help="plan many devices on one edge and a cloud (each device's units and "
                        "share of the medium), against EdgeSplit and the other baselines")
    pf.add_argument("file", help="a fleet file (TOML): the servers' profile, each device's profile, samples, radio")
    pf.add_argument("--budget", type=_positive_float, default=0.8, metavar="S", help="search time before settling")
    pf.add_argument("--energy-budget", type=_positive_float, metavar="J",
                    help="every device's most joules per step (beside the fleet file's budget_j)")
    pf.add_argument("--energy-budget-w", type=_positive_float, metavar="W",
                    help="every device's most watts on average over training, its watt-hours per hour (beside the "
                         "fleet file's budget_w): the step is paced to keep it")
    pf.add_argument("--sync-every", type=_positive_int, default=1, metavar="K",
                    help="periodic sync: the devices' weights travel once every K steps ([fleet] sync = { every = K })")
    pf.add_argument("--json", action="store_true", help="print one JSON object")
    pf.set_defaults(handler=commands.cmd_plan_fleet)

    for name, what in (("device", "the edge device: data source and trainer"), ("edge", "the edge server's trainer"),
                       ("cloud", "the cloud trainer"), ("planner", "the planner: re-plans on telemetry")):
        svc = sub.add_parser(name, help=what).add_subparsers(dest="action", required=True, parser_class=_Parser)
        run = svc.add_parser("run", help=f"run the {name} service")
        run.add_argument("--config", required=True)
        if name != "planner":
            run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        run.set_defaults(handler=commands.cmd_service_run)
        inst = svc.add_parser("install-service", help=f"write a systemd unit for the {name} service")
        inst.add_argument("--config", required=True)
        inst.add_argument("--unit-dir", default="/etc/systemd/system")
        inst.add_argument("--user", help="the unprivileged user to run as (default: the config's owner; never root)")
        inst.set_defaults(handler=commands.cmd_service_install)

    bench = sub.add_parser("bench", help="benchmarks (JSON on stdout, --out to keep it)")
    bench.add_argument("which", choices=list(BENCHES))
    bench.add_argument("--out", help="write the JSON here (and a PNG beside it where there is a figure)")
    bench.add_argument("--size-mb", type=_positive_int, default=4, help="wire/transport: tensor size")
    bench.add_argument("--count", type=_positive_int, default=40, help="wire/transport: messages per run; runtime: iterations per schedule; failover: iterations per run")
    bench.add_argument("--repeat", type=_positive_int, default=5)
    bench.add_argument("--profiles", default="bench/profiles", help="planner: directory of <model>.json profiles")
    bench.add_argument("--batch", type=_batch, default=64, help="planner: batch size")
    bench.add_argument("--milp", action="store_true", help="planner: also time the python-mip MILP and compare")
    bench.add_argument("--model", default="lenet5", type=_model, metavar="MODEL", help="testbed: the model")
    bench.add_argument("--points", default="1.5,2,3,4,5", help="testbed: edge-cloud rates, Mbit/s")
    bench.add_argument("--policies", default="hiertrain,all-edge,all-cloud,jointdnn,jointdnn+,jalad",
                       help="testbed: policies to run (also two-way, three-way: fixed hybrid schedules)")
    bench.add_argument("--speeds", default="1:4:40", help="testbed: device:edge:cloud speed ratio to calibrate to")
    bench.add_argument("--interpreter-ratios", metavar="D:E",
                       help="testbed: emulate the device's and the edge's Python D and E times slower than a core here "
                            f"(their CPU quotas) and their kernels apart (a dilation); the paper's Pi 3 and i3-7100U: "
                            f"{PAPER_INTERPRETER} (hiertrain.lab.emulation)")
    bench.add_argument("--device-quota", type=_positive_float, help="testbed: device CPU (cores) instead of calibrating; deviceloop: the Pi-3 quota")
    bench.add_argument("--edge-quota", type=_positive_float, help="testbed: edge CPU (cores) instead of calibrating")
    bench.add_argument("--bw-device-edge", type=_positive_float, default=5.0, help="testbed: device-edge Mbit/s; failover: both links' rate")
    bench.add_argument("--no-fit", action="store_true", help="testbed: skip the overhead fit (paper model only)")
    bench.add_argument("--testbed", action="store_true",
                       help="failover: run each job in the testbed's namespaces, links shaped to --bw-device-edge (root); "
                            "energy: run every plan on the fleet testbed (root)")
    bench.add_argument("--from", dest="source", help="replan, edgecores: the bench testbed JSON to take the "
                                                      "calibrated profile and quotas from; energy: a bench fleet "
                                                      "JSON whose measured seconds to add")
    bench.add_argument("--link", choices=["edge_cloud", "device_edge"], default="edge_cloud",
                       help="replan: the link whose rate changes (--points before,after)")
    bench.add_argument("--cores", default="1,2,3,4", help="edgecores: emulated edge cores")
    bench.add_argument("--devices", type=_positive_int, default=4, help="fleet, energy: devices (Pi 3, Pi 4, Jetson-class); broker: clients and fleet devices")
    bench.add_argument("--edges", type=_positive_int, help="fleet-planner: plan --devices over this many edge servers (at scale)")
    bench.add_argument("--medium", default="5,20,50", help="fleet, energy: rates of the shared device-edge medium, Mbit/s")
    bench.add_argument("--results", default="bench/results", help="report: directory of the JSON results")
    bench.add_argument("--readme", default="README.md", help="report: the README whose benchmark table it rewrites")
    bench.add_argument("--check", action="store_true", help="exit 1 when the benchmark misses its goal")
    bench.add_argument("--quick", action="store_true",
                       help="the smallest run that takes every path of the benchmark (its smoke test); figures not "
                            "for quoting: bench report refuses them")
    bench.add_argument("--data", help="families, sync: an .npz of images (x [N, C, H, W], y) to train on")
    bench.add_argument("--every", default="2,4,8", help="sync: periodic sync's K values to run (FedAvg at the largest); "
                                                         "hierarchy: the K2 values (and the flat runs' K, the largest)")
    bench.add_argument("--wan", type=_positive_float, default=5.0, help="hierarchy: each site's WAN to the cloud, Mbit/s")
    bench.add_argument("--library", default="written", choices=("written", "transformers"),
                       help="families: the hand-written families (after torchvision's and timm's code) or Hugging "
                            "Face transformers' own models (needs transformers)")
    bench.add_argument("--families", default="", help="families: which architectures (default: the library's all)")
    bench.add_argument("--optimizer", default="recipe", choices=("recipe", *OPTIMIZERS),
                       help="families: every family's (default: each its published recipe's)")
    bench.add_argument("--lr", type=_positive_float,
                       help="families: the learning rate (default: 0.05 for sgd, 0.005 for adamw)")
    bench.set_defaults(handler=commands.cmd_bench)
    return p


def _model(text: str) -> str:
    """--model: one of the zoo's names, or a path to an .onnx file (a user's model)."""
    from hiertrain import MODEL_NAMES  # the core install has no onnx: names only

    if text in MODEL_NAMES:
        return text
    if not text.endswith(".onnx"):
        raise argparse.ArgumentTypeError(f"{text!r} is neither one of {', '.join(MODEL_NAMES)} nor an .onnx file")
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no model file {text}")
    return str(Path(text).resolve())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except HiertrainError as exc:
        print(f"hiertrain: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # a command of an extra this install lacks
        extra = EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"hiertrain: error: `hiertrain {args.command}` needs {exc.name}: pip install 'hiertrain[{extra}]'",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
