"""What each ``hiertrain`` subcommand does, given its parsed arguments (the parser is :mod:`hiertrain.cli`).

Handlers import what they need lazily, so a device install without the solver or the plotting
stack still runs the commands it has.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from hiertrain.errors import HiertrainError


def cmd_demo(args: argparse.Namespace) -> int:
    from hiertrain import demo
    from hiertrain.errors import ConfigError

    if args.devices:
        if args.data:
            raise ConfigError("--data with --devices: a fleet demo trains shards of the synthetic set")
        return demo.run_fleet(devices=args.devices, model=args.model, iterations=args.iterations, lr=args.lr,
                              optimizer=args.optimizer, workdir=args.workdir, keep=args.keep, quotas=not args.no_quota,
                              dashboard=args.dashboard)
    return demo.run(model=args.model, iterations=args.iterations, batch=args.batch, lr=args.lr,
                    bw_device_edge=args.bw_device_edge, bw_edge_cloud=args.bw_edge_cloud,
                    device_quota=None if args.no_quota else args.device_quota, workdir=args.workdir, keep=args.keep,
                    data_path=args.data, optimizer=args.optimizer, dashboard=args.dashboard)


def cmd_init(args: argparse.Namespace) -> int:
    from hiertrain import scaffold
    from hiertrain.broker.layout import DEFAULT_PORT

    root = Path(args.dir)
    folders = scaffold.init(root, job=args.job or root.resolve().name, host=args.host, port=args.port or DEFAULT_PORT,
                            bind=args.bind, model=args.model, batch=args.batch, iterations=args.iterations, lr=args.lr,
                            dataset=args.data, data_path=args.data_path, bw_device_edge=args.bw_device_edge,
                            bw_edge_cloud=args.bw_edge_cloud, force=args.force, devices=args.devices)
    print(f"job files in {root}: {', '.join(f.name + '/' for f in folders)} (one folder per machine); "
          f"what to run on each: {root / 'README.md'}")
    return 0


# ------------------------------------------------------------------------------------ broker


def cmd_broker_init(args: argparse.Namespace) -> int:
    from hiertrain.broker.layout import DEFAULT_PORT, BrokerDir, Settings

    settings = Settings(host=args.host, port=args.port or DEFAULT_PORT, bind=args.bind,
                        max_packet_bytes=args.max_packet_mb << 20, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, tls_ca=args.tls_ca, job=args.job)
    bdir = BrokerDir(args.dir)
    bdir.init(settings, force=args.force)
    from hiertrain.broker.mosquitto import write_config

    write_config(bdir)
    print(f"broker directory {bdir.root}: accounts {', '.join(sorted(p.stem for p in bdir.credentials.glob('*.json')))}; "
          f"give each tier its file from {bdir.credentials}")
    return 0


def cmd_broker_device(args: argparse.Namespace) -> int:
    from hiertrain.broker import mosquitto
    from hiertrain.broker.layout import BrokerDir

    bdir = BrokerDir(args.dir)
    if args.action == "add-device":
        creds = bdir.add_device(args.name)
        done = f"enrolled {args.name}: copy {creds} to the device (mode 0600)"
    else:
        bdir.remove_device(args.name)
        done = f"removed {args.name}: its account and credentials are gone"
    pid = mosquitto.reload(bdir)
    print(f"{done}; " + (f"the running broker (pid {pid}) reloaded its accounts" if pid else
                         "no Mosquitto runs for this directory: it reads the accounts when it starts "
                         "(an embedded broker: restart it)"))
    return 0


def cmd_broker_site(args: argparse.Namespace) -> int:
    """``broker add-site`` (the cloud's broker) and ``broker bridge`` (a site's broker)."""
    from dataclasses import replace

    from hiertrain.broker import mosquitto
    from hiertrain.broker.layout import BrokerDir

    bdir = BrokerDir(args.dir)
    if args.action == "add-site":
        creds = bdir.add_site(args.site)
        pid = mosquitto.reload(bdir)
        print(f"site {args.site}: its bridge account is in {creds}; copy it to the site's edge server (mode 0600) "
              f"and run `hiertrain broker bridge --site {args.site} --to <that file> --dir <its broker>` there"
              + (f"; the running broker (pid {pid}) reloaded its accounts" if pid else ""))
        return 0
    settings = replace(bdir.settings(), site=args.site, bridge=str(args.to.resolve()))  # (checked: one line)
    bdir.save(settings)
    mosquitto.write_config(bdir)
    to = settings.bridge_endpoint()
    print(f"site {args.site} of job {settings.job}: its broker bridges sync/up/{args.site} out and sync/down in to "
          f"{to.host}:{to.port} as {to.username}; (re)start it (`hiertrain broker start --dir {bdir.root}`)")
    return 0


def cmd_broker_start(args: argparse.Namespace) -> int:
    import os

    from hiertrain.broker import embedded, mosquitto
    from hiertrain.broker.layout import BrokerDir

    bdir = BrokerDir(args.dir)
    if args.embedded or mosquitto.executable() is None:
        if not args.embedded:
            print("hiertrain: mosquitto is not installed; running the embedded amqtt broker "
                  "(for demos; install mosquitto for deployments)", file=sys.stderr)
        return embedded.main(["--dir", str(bdir.root)] + (["--port", str(args.port)] if args.port else []))
    mosquitto.write_config(bdir, args.port)
    argv = mosquitto.command(bdir)
    sys.stdout.flush()
    os.execv(argv[0], argv)
    return 1  # not reached


def cmd_broker_install_service(args: argparse.Namespace) -> int:
    from hiertrain.broker.layout import BrokerDir
    from hiertrain import systemd

    bdir = BrokerDir(args.dir)
    bdir.settings()  # fails clearly if not initialised
    unit = systemd.install("broker", description="hiertrain MQTT broker (Mosquitto)",
                           subcommand=["broker", "start", "--dir", str(bdir.root)], owned=bdir.root,
                           unit_dir=Path(args.unit_dir), user=args.user)
    print(f"wrote {unit}; enable it with: systemctl daemon-reload && systemctl enable --now {unit.name}")
    return 0


# ---------------------------------------------------------------------------------- schedule


def cmd_schedule_watch(args: argparse.Namespace) -> int:
    from hiertrain import config
    from hiertrain.watch import watch

    return watch(config.load(args.config), count=args.count, timeout=args.timeout, as_json=args.json)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from hiertrain import config
    from hiertrain.dashboard.server import serve

    _terminate_like_ctrl_c()
    return serve(config.load(args.config), port=args.port, bind=args.bind, cert=args.cert, key=args.key)


# ----------------------------------------------------------------------------------- profile


def cmd_profile(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from hiertrain.profile import Profile

    join: Any = None
    _terminate_like_ctrl_c()
    if args.cpu_quota and not os.environ.get("HIERTRAIN_CGROUP"):
        from hiertrain.lab.cgroup import CpuQuota

        with CpuQuota(args.cpu_quota) as quota:  # run this same command again; it joins the group when ready
            return subprocess.call([sys.executable, "-m", "hiertrain", *args.argv],
                                   env={**os.environ, "HIERTRAIN_CGROUP": str(quota.path)})
    if os.environ.get("HIERTRAIN_CGROUP"):
        # start-up and graph building run at full speed; only the measurement runs under the quota
        join = lambda: (Path(os.environ["HIERTRAIN_CGROUP"]) / "cgroup.procs").write_text(str(os.getpid()))  # noqa: E731
    from hiertrain.train import artifacts, profiler
    from hiertrain.train.runtime import Runtime

    runtime = Runtime(threads=args.threads, provider=artifacts.provider(Path(args.segments), None) if args.segments
                      else None, dilation=args.kernel_dilation) if args.segments or args.kernel_dilation > 1 else None
    prof = profiler.measure(args.model, args.batch, tier=args.tier, threads=args.threads, repeat=args.repeat,
                            warmup=args.warmup, optimizer=args.optimizer, on_ready=join, runtime=runtime,
                            note={**({"cpu_quota": args.cpu_quota} if args.cpu_quota else {}),
                                  **({"kernel_dilation": args.kernel_dilation} if args.kernel_dilation > 1 else {})} or None,
                            sample_dtype=args.sample_dtype)
    out = Path(args.out)
    if args.merge and out.exists():
        prof = Profile.load(out).merged(args.tier, prof)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof.to_json(), indent=1) + "\n")
    t = prof.tiers[args.tier]
    print(f"{args.model} on {args.tier}: {prof.n_units} units, forward {sum(t.forward_s) * 1e3:.3f} ms/sample, "
          f"backward {sum(t.backward_s) * 1e3:.3f} ms/sample, update {sum(t.update_s) * 1e3:.2f} ms -> {out}")
    return 0


# -------------------------------------------------------------------------------------- plan


def cmd_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hiertrain import TIERS
    from hiertrain.errors import ConfigError
    from hiertrain.profile import Profile
    from hiertrain.planner import energy as E
    from hiertrain.planner.baselines import plan
    from hiertrain.planner.costmodel import Bandwidth

    profile = Profile.load(args.profile[0])
    for path in args.profile[1:]:
        other = Profile.load(path)
        for tier in other.tiers:
            profile = profile.merged(tier, other)
    overrides = {}
    for item in args.power:
        tier, _, cls = item.partition("=")
        if tier not in TIERS or not cls:
            raise ConfigError(f"--power {item!r}: expected TIER=CLASS with TIER one of {', '.join(TIERS)}")
        overrides[tier] = cls
    powers = E.tier_powers(profile, overrides)
    bw = Bandwidth(args.bw_device_edge, args.bw_edge_cloud)
    budgeted = args.energy_budget is not None or args.energy_budget_w is not None
    if args.objective == "energy" and budgeted or args.objective == "budget" and args.deadline:
        raise ConfigError("--deadline goes with --objective energy, --energy-budget(-w) with --objective budget")
    if args.objective == "budget" and not budgeted:
        raise ConfigError("--objective budget needs --energy-budget J (the device's joules per step) or "
                          "--energy-budget-w W (its average watts)")
    if args.objective == "time":
        schedule = plan(profile, bw, args.batch, policy=args.policy, cost_model=args.cost_model,
                        solver_name=args.solver)
        joules = E.schedule_joules(profile, bw, schedule, cost_model=args.cost_model, powers=powers)
    else:
        if args.policy != "hiertrain" or args.solver != "exact":
            raise ConfigError(f"--objective {args.objective} searches HierTrain's space itself (no --policy or --solver)")
        goal = E.Goal(args.objective, deadline_s=args.deadline or float("inf"),
                      budget_j={"device": args.energy_budget} if args.energy_budget else {}, scope=args.energy_scope,
                      budget_w={"device": args.energy_budget_w} if args.energy_budget_w else {})
        found = E.plan_three_tier(profile, bw, args.batch, goal, cost_model=args.cost_model, powers=powers)
        schedule, joules = found.schedule, found.joules
    schedule = replace(schedule, extra={**schedule.extra, "objective": args.objective,
                                        "joules": {t: round(j, 6) for t, j in joules.items()}})
    if args.json:
        print(json.dumps(schedule.to_json()))
    else:
        spent = ", ".join(f"{t} {j:.3g} J" for t, j in joules.items())
        pace = f"; paced to {schedule.extra['pace_s']:.4g} s for the device's average watts" \
            if schedule.extra.get("pace_s") else ""
        print(f"{schedule.describe()}; per step {spent}{pace} (solved in {schedule.solve_s * 1e3:.1f} ms)")
    return 0


def cmd_plan_fleet(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hiertrain.planner import fleetenergy as FE
    from hiertrain.planner import fleet as F
    from hiertrain.planner import fleetfile as FF
    from hiertrain.planner import fleetpolicies as FP

    fl = replace(FF.load(args.file), sync_every=args.sync_every)
    fl = replace(fl, devices=tuple(replace(d, budget_j=d.budget_j or args.energy_budget,
                                           budget_w=d.budget_w or args.energy_budget_w) for d in fl.devices))
    budgeted = any(d.budget_j or d.budget_w for d in fl.devices)
    plan = FE.fleet_budget(fl, budget_s=args.budget) if budgeted else F.solve(fl, budget_s=args.budget)
    others = {p: FP.baseline(fl, p) for p in FP.POLICIES[1:]}
    joules = FE.fleet_joules(fl, plan)
    if args.json:
        print(json.dumps({"policy": plan.policy, "iteration_s": plan.iteration_s, "optimal": plan.parts["optimal"],
                          "sync_every": fl.sync_every,
                          "devices": [{"name": d.name, "device_units": p.m, "edge_to": p.k, "share_mbps": s,
                                       "joules": joules[d.name], "budget_j": d.budget_j, "budget_w": d.budget_w,
                                       "watts": joules[d.name] / plan.iteration_s}
                                      for d, p, s in zip(fl.devices, plan.paths, plan.shares_mbps)],
                          "joules": joules, "parts": plan.parts,
                          "baselines_s": {p: b.iteration_s for p, b in others.items()},
                          "baselines_joules": {p: FE.fleet_joules(fl, b) for p, b in others.items()}}))
        return 0
    pace = f", paced to {plan.parts['pace_s']:.4f} s for average watts" if plan.parts.get("pace_s") else ""
    print(f"{plan.iteration_s:.4f} s/iteration ({'optimal' if plan.parts['optimal'] else 'best found in the budget'}"
          f"{', within every energy budget' if budgeted else ''}"
          f"{pace}"
          f"{f', devices averaged every {fl.sync_every} steps' if fl.sync_every > 1 else ''}):")
    for d, line in zip(fl.devices, F.describe(fl, plan)):
        budget = ", ".join(([f"budget {d.budget_j:g} J"] if d.budget_j else [])
                           + ([f"budget {d.budget_w:g} W"] if d.budget_w else []))
        print(f"  {line}; {joules[d.name]:.3g} J per step, {joules[d.name] / plan.iteration_s:.3g} W"
              f"{f' ({budget})' if budget else ''}")
    print(f"  edge {joules['edge']:.3g} J, cloud {joules['cloud']:.3g} J per step")

    def devices_j(p: F.FleetPlan) -> float:
        j = FE.fleet_joules(fl, p)
        return sum(j[d.name] for d in fl.devices)

    print("baselines: " + ", ".join(f"{p} {b.iteration_s:.4f} s ({devices_j(b):.3g} J on the devices)"
                                    for p, b in others.items()))
    return 0


# ------------------------------------------------------------------------- tiers and planner


def cmd_service_run(args: argparse.Namespace) -> int:
    import importlib

    if args.command == "planner":
        from hiertrain import config
        from hiertrain.planner.service import run as run_planner

        return run_planner(config.load(args.config))
    return importlib.import_module(f"hiertrain.{args.command}").run(args.config, resume=args.resume)


def cmd_service_install(args: argparse.Namespace) -> int:
    from hiertrain import config, systemd

    cfg = Path(args.config).resolve()
    config.load(cfg)  # fails clearly on a bad file
    resume = ["--resume"] if args.command != "planner" else []  # a restarted tier continues its run
    unit = systemd.install(args.command, description=f"hiertrain {args.command} service",
                           subcommand=[args.command, "run", "--config", str(cfg), *resume], owned=cfg,
                           unit_dir=Path(args.unit_dir), user=args.user)
    print(f"wrote {unit}; enable it with: systemctl daemon-reload && systemctl enable --now {unit.name}")
    return 0


# ------------------------------------------------------------------------------------- bench


def _terminate_like_ctrl_c() -> None:
    """SIGTERM cleans up like Ctrl-C does (namespaces, cgroups, processes we started)."""
    import signal

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_bench(args: argparse.Namespace) -> int:
    from hiertrain.bench import run

    _terminate_like_ctrl_c()
    with contextlib.redirect_stdout(sys.stderr):  # progress lines: stdout carries the JSON alone
        result = run(args.which, args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    missed = [k for k, v in result.items() if k.startswith("meets_goal") and v is False]
    if args.check and missed:
        print(f"hiertrain: bench {args.which}: goal not met ({', '.join(missed)} is false)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------ parser


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hiertrain import tierconfig
    from hiertrain.train.evaluate import evaluate

    r = evaluate(tierconfig.load("device", args.config), Path(args.checkpoint).resolve() if args.checkpoint else None)
    print(f"accuracy {r.accuracy:.4f}, loss {r.loss:.4f} on {r.samples} held-out samples "
          f"(checkpoint of iteration {r.iteration})")
    return 0


def cmd_segments_build(args: argparse.Namespace) -> int:
    import time

    from hiertrain.train import artifacts, models

    t0 = time.perf_counter()
    out = Path(args.out)
    manifest = artifacts.build_dir(models.get(args.model), out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{len(manifest['segments'])} segments of {args.model} in {out} ({size / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.1f} s); copy the directory and set [runtime] segments = \"{out}\"")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    from hiertrain.train import onnxmodel, segments

    spec, found = onnxmodel.inspect(Path(args.file))
    checked = onnxmodel.check_gradients(spec) if segments.can_build() and not args.no_check else None
    if args.json:
        print(json.dumps({"model": spec.name, "file": str(found.path), "input_shape": list(spec.input_shape),
                          "classes": spec.classes, "cut_points": found.cut_points, "units": found.units,
                          "parameters": found.original, "gradients_checked_s": checked}, indent=2))
        return 0
    print(f"{spec.name}: input {list(spec.input_shape)}, {spec.classes} classes, {found.nodes} nodes, "
          f"{found.cut_points} cut points, {spec.n_units} units")
    for i, u in enumerate(found.units, 1):
        print(f"  {i:>3} {u['name']:<24} {u['params']:>10,} params  out {u['output']}  {' '.join(u['ops'])}")
    if spec.momentum:
        print(f"BatchNorm in training mode: {len(spec.momentum)} layers normalise by their batch (per worker where "
              f"a split divides it) and keep running statistics for evaluation and model export")
    print(f"gradients of every op built and lowered in {checked:.2f} s" if checked is not None else
          "gradients not checked here (no onnxruntime-training builder" + (")" if not args.no_check else "; --no-check)"))
    print(f'train it: [train] model = "{args.file}" in every tier\'s config, or hiertrain demo --model {args.file}')
    return 0


def cmd_model_export(args: argparse.Namespace) -> int:
    from hiertrain.train import checkpoint, models, onnxmodel

    spec = models.get(args.model)
    ck = checkpoint.load(Path(args.checkpoint), list(spec.param_shapes()))
    if ck is None:
        raise HiertrainError(f"no checkpoint of {spec.name} in {args.checkpoint}")
    n = onnxmodel.export(Path(args.model), ck.params, Path(args.out))
    print(f"wrote {args.out}: {args.model} with the {n} trained parameters of iteration {ck.iteration}")
    return 0
