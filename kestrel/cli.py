"""`kestrel` command line: generate, serve, bench, sql."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from kestrel.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, so the CLI and the Python API never drift apart."""
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        if f.metadata.get("nargs"):
            parser.add_argument(flag, nargs=f.metadata["nargs"], default=f.default, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(flag, type=base, default=f.default, help=f"{help_text} (default: {f.default})")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.field_names()})


def cmd_generate(args: argparse.Namespace) -> int:
    from kestrel import Engine, SamplingParams
    from kestrel.lora.manager import UnknownAdapter

    prompts = list(args.prompt)
    if args.file:
        with open(args.file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("error: give a prompt or --file with one prompt per line", file=sys.stderr)
        return 2
    config = engine_config_from_args(args)
    if args.lora is not None and args.lora not in config.lora_modules:  # say so before loading the model
        print(f"error: {UnknownAdapter.named(args.lora, config.lora_modules)}", file=sys.stderr)
        return 2
    engine = Engine(config=config)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed, stop=args.stop or None)
    inputs = [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts] if not args.raw else prompts
    if len(inputs) == 1:
        for delta in engine.stream(inputs[0], params, lora=args.lora):
            print(delta.text, end="", flush=True)
        print()
        return 0
    outs = engine.generate(inputs, params, use_tqdm=True, lora=args.lora)
    for prompt, out in zip(prompts, outs):
        print(f"### {prompt}\n{out.text}\n")
    s = engine.stats
    print(f"[{len(outs)} prompts, {s.prompt_tokens} prompt tokens ({s.cached_tokens} cached), "
          f"{s.output_tokens} output tokens in {s.step_time:.1f}s: {s.output_tokens / max(s.step_time, 1e-9):.1f} tok/s]",
          file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import contextlib
    import signal
    import threading

    import uvicorn

    from kestrel.model.loader import import_tokenizer_classes
    from kestrel.server.api import build_app
    from kestrel.server.engine_process import EngineClient, EngineStartError
    from kestrel.server.server import Server

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="kestrel %(levelname)s %(name)s: %(message)s")
    config = engine_config_from_args(args)
    arena = arena_config_from_args(args)  # before the model loads: a bad flag fails fast
    cluster = cluster_config_from_args(args)
    # the tokenizer's imports (~2 s) run here while the engine process loads the model, not after it
    threading.Thread(target=import_tokenizer_classes, daemon=True, name="kestrel-imports").start()
    try:
        if cluster is None:
            print("kestrel: starting the engine process (loading the model)...", file=sys.stderr, flush=True)
            client = EngineClient(config, max_restarts=args.max_engine_restarts)
        else:
            from kestrel.cluster.client import ClusterClient
            print(f"kestrel: starting {len(cluster.roles())} engine instances on Ray (loading the model)...",
                  file=sys.stderr, flush=True)
            client = ClusterClient(config, cluster, max_restarts=args.max_engine_restarts)
    except EngineStartError as e:
        print(f"kestrel: error: the engine could not start: {e}", file=sys.stderr)
        return 1
    print(f"kestrel: engine ready: {client.info['placement']}", file=sys.stderr, flush=True)
    try:
        server = Server(client, args.served_model_name, args.api_key,
                        max_queued=config.max_running_requests + args.max_queued_requests,
                        max_client_labels=args.max_client_labels)
        app = build_app(server, arena)
        url = f"http://{args.host}:{args.port}"
        print(f"kestrel: serving {args.served_model_name!r} at {url}/v1\n"
              f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
              f"""-d '{{"model":"{args.served_model_name}","messages":[{{"role":"user","content":"Hi"}}]}}'""",
              file=sys.stderr, flush=True)
        http = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                             timeout_graceful_shutdown=30))

        def stop(*_):  # stop accepting, let in-flight requests finish, then exit 0 (uvicorn would re-raise)
            http.should_exit = True

        http.capture_signals = contextlib.nullcontext
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        http.run()
    finally:
        client.shutdown()
    return 0


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("several engine instances on Ray (kestrel/cluster)")
    g.add_argument("--instances", type=int, default=1, help="engine instances behind this server (more than 1: on "
                                                           "Ray, a local one started unless --ray-address)")
    g.add_argument("--router", default="least-load", help="dispatch: round-robin | least-load (the least "
                                                          "KV held and queued) | cache-aware (longest cached prefix, as "
                                                          "SGLang's router) | llumnix (least-load + migration)")
    g.add_argument("--migration", default="off", choices=["on", "off"],
                   help="live migration of running requests from the most to the least used instance (Llumnix)")
    g.add_argument("--migration-gap", type=float, default=0.25,
                   help="usage difference (share of the KV pool, queued demand included) that triggers a migration")
    g.add_argument("--prefill-instances", type=int, default=0, help="disaggregated serving (DistServe): instances "
                                                                    "that only prefill ...")
    g.add_argument("--decode-instances", type=int, default=0, help="... and instances that only decode")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto': the one this machine is in)")
    g.add_argument("--cpus-per-instance", type=float, default=None, help="CPU cores per instance (default: the "
                                                                         "cores here over the instances)")
    g.add_argument("--gpus-per-instance", type=float, default=0.0, help="GPUs per instance")


def cluster_config_from_args(args: argparse.Namespace):
    """A ClusterConfig when the flags ask for more than one engine process, else None (one engine process)."""
    from kestrel.cluster.client import ClusterConfig

    if (args.instances == 1 and not args.prefill_instances and not args.decode_instances and not args.ray_address
            and args.migration == "off" and args.router in ("least-load", "round-robin")):
        return None
    return ClusterConfig(instances=args.instances, prefill_instances=args.prefill_instances,
                         decode_instances=args.decode_instances, router=args.router, migration=args.migration == "on",
                         migration_gap=args.migration_gap, ray_address=args.ray_address,
                         cpus_per_instance=args.cpus_per_instance, gpus_per_instance=args.gpus_per_instance)


def cmd_plan(args: argparse.Namespace) -> int:
    from kestrel.cluster.plan import CostModel, Workload, fetch_step_profile, measure, plan, role_costs

    for name in ("slo_ttft", "slo_tpot"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds")
    if not 1 <= args.max_instances <= 16:
        raise ValueError("--max-instances must be between 1 and 16")
    workload = Workload.load(args.workload)
    config = engine_config_from_args(args)
    split_costs = None
    if args.profile_from:
        profile = fetch_step_profile(args.profile_from, args.api_key)
        cost = CostModel.from_profile(profile)
        split_costs = role_costs(profile)  # a disaggregated deployment's: its splits priced per role
    elif args.profile:
        cost, split_costs = CostModel.load_with_roles(args.profile)
    else:
        cost = measure(config)
    if args.save_profile:
        cost.save(args.save_profile, split_costs)
    options = plan(cost, config, workload, args.slo_ttft, args.slo_tpot, args.max_instances, args.attainment,
                   router=args.router, split_costs=split_costs)
    if args.format == "json":
        roles = {} if split_costs is None else {"prefill_cost_model": dataclasses.asdict(split_costs[0]),
                                                "decode_cost_model": dataclasses.asdict(split_costs[1])}
        print(json.dumps({"cost_model": dataclasses.asdict(cost), **roles, "options": [
            dict(dataclasses.asdict(o), per_instance=o.per_instance, label=o.label) for o in options]}, indent=1))
        return 0
    print(f"cost model: {cost.describe()}")
    if split_costs is not None:
        print(f"prefill instances: {split_costs[0].describe()}\ndecode instances: {split_costs[1].describe()}")
    print(f"{len(workload.lengths)} requests; SLOs: TTFT <= {args.slo_ttft:g} s, TPOT <= {args.slo_tpot:g} s, "
          f"for {args.attainment:.0%} of requests")
    print(f"{'deployment':<22} {'goodput req/s':>14} {'per instance':>13}")
    for o in options:
        print(f"{o.label:<22} {o.goodput:>14.3f} {o.per_instance:>13.3f}")
    best = options[0]
    flags = (f"--instances {best.instances}" if best.prefill == 0
             else f"--prefill-instances {best.prefill} --decode-instances {best.decode}")
    print(f"best: {best.label}  ->  kestrel serve {flags}")
    return 0


def arena_config_from_args(args: argparse.Namespace):
    from kestrel.arena.routes import ArenaConfig
    from kestrel.arena.store import default_path

    endpoints = {}
    for spec in args.arena_endpoint or []:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--arena-endpoint takes NAME=URL (an OpenAI-compatible base URL), got {spec!r}")
        endpoints[name] = url
    loopback = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    return ArenaConfig(store_path=default_path(args.data_dir), self_url=f"http://{loopback}:{args.port}/v1",
                       api_key=args.api_key, endpoints=endpoints, sampling=args.arena_sampling,
                       rate_limit=args.arena_rate_limit)


def cmd_arena(args: argparse.Namespace) -> int:
    """kestrel arena leaderboard: ratings from a battle log, offline."""
    import json

    from kestrel.arena.ratings import Battle, leaderboard
    from kestrel.arena.store import read_battle_log

    with open(args.votes) as f:
        try:
            battles = [Battle(r["model_a"], r["model_b"], r["winner"]) for r in read_battle_log(f)]
        except ValueError as e:
            raise ValueError(f"{args.votes} {e}") from None
    board = leaderboard(battles, rounds=args.rounds, seed=args.seed, anchor=args.anchor, progress=sys.stderr.isatty())
    print(json.dumps(dict(board.to_json(), votes=len(battles)), indent=2) if args.format == "json" else board.table())
    if args.plot:
        fmt = "svg" if args.plot.endswith(".svg") else "png"
        with open(args.plot, "wb") as f:
            f.write(board.plot(fmt))
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    """kestrel judge: answers, judgments and a summary; or the judge's agreement with an arena battle log."""
    import json

    from kestrel.arena import judge as J

    judge = J.Judge(args.base_url, args.api_key, args.judge, constrain=not args.no_constrain,
                    explanation_chars=args.explanation_chars)
    stem = args.output[:-6] if args.output.endswith(".jsonl") else args.output
    progress = sys.stderr.isatty()
    if args.battles:
        with open(args.battles) as f:
            battles = [json.loads(line) for line in f if line.strip()]
        result = judge.agreement([b for b in battles if b.get("winner")], progress)
        with open(args.output, "w") as f:
            f.writelines(json.dumps(j) + "\n" for j in result.pop("judgments"))
        print(json.dumps(result, indent=2))
        return 0
    if not args.models:
        raise ValueError("give --models a,b (or --battles LOG for agreement with human votes)")
    models = [J.Model.parse(m) for m in args.models.split(",")]
    if len({m.label for m in models}) != len(models):
        raise ValueError("--models names the same model twice")
    if args.mode != "single" and len(models) < 2:
        raise ValueError("pairwise judging needs two models or more: --models a,b (or --mode single)")
    questions = J.load_questions(args.questions or J.QUESTIONS)[:args.max_questions]
    answers = judge.answers(models, questions, progress)
    with open(stem + ".answers.jsonl", "w") as f:
        f.writelines(json.dumps({"model": label, "question_id": qid, "answers": a}) + "\n"
                     for (label, qid), a in answers.items())
    single = judge.grade(models, questions, answers, progress) if args.mode in ("single", "both") else []
    pairwise = judge.compare(models, questions, answers, progress) if args.mode in ("pairwise", "both") else []
    with open(args.output, "w") as f:
        f.writelines(json.dumps(dict(j, mode="single")) + "\n" for j in single)
        f.writelines(json.dumps(dict(j, mode="pairwise")) + "\n" for j in pairwise)
    summary = J.summarize(single, pairwise)
    with open(stem + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    """Run a SQL query whose llm() calls run on the engine (or --base-url), planned together; or show the plan."""
    import duckdb

    import kestrel.sql as ks

    con = duckdb.connect()
    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    fds = [tuple(x.strip() for x in fd.split("->")) for fd in args.fd] if args.fd else "discover"
    if any(len(fd) != 2 for fd in fds if fds != "discover"):
        raise ValueError("--fd takes 'Determinant -> Dependent', e.g. --fd 'City -> State'")
    plan = {"dedup": not args.no_dedup, "order": args.order, "reorder_fields": not args.keep_field_order, "fds": fds}
    if args.base_url:
        ks.register(con, base_url=args.base_url, api_key=args.api_key, model=args.model_name, **plan, **defaults)
    else:
        from kestrel.engine.engine import Engine
        ks.register(con, engine=Engine(config=engine_config_from_args(args)), **plan, **defaults)
    if args.explain:
        print(ks.explain(con, args.query).describe())
        return 0
    rel = ks.sql(con, args.query)
    if args.format == "table":
        rel.show(max_rows=args.max_rows)
    else:
        import csv
        import json
        rows = rel.fetchall()
        if args.format == "csv":
            w = csv.writer(sys.stdout)
            w.writerow(rel.columns)
            w.writerows(rows)
        else:
            for row in rows:
                print(json.dumps(dict(zip(rel.columns, row)), default=str, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kestrel", description="Kestrel LLM serving system")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline (chat-formatted unless --raw)")
    gen.add_argument("prompt", nargs="*", help="prompt text (one or more)")
    gen.add_argument("--file", help="a file with one prompt per line")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    gen.add_argument("--lora", default=None, help="generate with this LoRA adapter (a name given in --lora-modules)")
    add_engine_args(gen)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=30000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health")
    serve.add_argument("--served-model-name", default="default", help="the model id clients send")
    serve.add_argument("--max-queued-requests", type=int, default=256,
                       help="requests beyond the running batch that may wait; more get 503")
    serve.add_argument("--max-client-labels", type=int, default=32,
                       help="clients (the `user` field / X-Kestrel-Client header) named in per-client metrics; "
                            "later ones are counted as 'other'")
    serve.add_argument("--max-engine-restarts", type=int, default=5,
                       help="restarts of a failed engine process allowed within 10 minutes before the server "
                            "gives up (and /health stays 503)")
    serve.add_argument("--log-level", default="warning")
    serve.add_argument("--data-dir", default=None, help="where the arena keeps its votes (arena.sqlite; default: "
                                                        "$KESTREL_DATA_DIR or ~/.local/share/kestrel)")
    serve.add_argument("--arena-endpoint", action="append", default=None, metavar="NAME=URL",
                       help="a model on another OpenAI-compatible server for the arena (repeatable)")
    serve.add_argument("--arena-sampling", default="uniform", choices=["uniform", "active"],
                       help="how the arena picks the two models of a battle")
    serve.add_argument("--arena-rate-limit", type=int, default=30, help="battles and votes per client a minute")
    add_engine_args(serve)
    add_cluster_args(serve)
    planp = sub.add_parser("plan", help="plan a deployment by simulation")
    plan_sub = planp.add_subparsers(dest="plan_command", required=True)
    dis = plan_sub.add_parser("disaggregation", help="choose the prefill:decode split (DistServe) that gives the most "
                                                     "goodput per instance under the SLOs")
    dis.add_argument("--workload", required=True, help="JSON list of {prompt_tokens, output_tokens[, arrival]}")
    dis.add_argument("--slo-ttft", type=float, required=True, help="time-to-first-token SLO, seconds")
    dis.add_argument("--slo-tpot", type=float, required=True, help="time-per-output-token SLO, seconds")
    dis.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet both SLOs")
    dis.add_argument("--max-instances", type=int, default=4)
    dis.add_argument("--profile", default=None, help="a cost model saved by --save-profile, per-role models "
                                                     "included (default: measure the model's step times now, "
                                                     "about a minute)")
    dis.add_argument("--save-profile", default=None, help="write the cost model here (and, from a disaggregated "
                                                          "deployment, its prefill and decode instances' models)")
    dis.add_argument("--profile-from", default=None, metavar="URL",
                     help="fit the cost model to the steps a running server (or deployment) took under its load "
                          "(its /step_profile), instead of measuring an idle engine here; a disaggregated "
                          "deployment's prefill and decode instances get a cost model each")
    dis.add_argument("--api-key", default=None, help="--profile-from: the server's API key")
    dis.add_argument("--format", default="table", choices=["table", "json"])
    from kestrel.cluster.dispatch import ROUTERS
    dis.add_argument("--router", default="least-load", choices=ROUTERS,
                     help="how the deployment will dispatch new requests (serve's --router; llumnix dispatches as "
                          "least-load)")
    add_engine_args(dis)
    from kestrel.bench.client import add_bench_args
    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible server under load")
    add_bench_args(bench)
    arena = sub.add_parser("arena", help="arena tools: the leaderboard of a battle log")
    arena_sub = arena.add_subparsers(dest="arena_command", required=True)
    board = arena_sub.add_parser("leaderboard", help="Bradley–Terry ratings with bootstrap intervals from a battle "
                                                     "log (JSONL: model_a, model_b, winner, as Chatbot Arena's)")
    board.add_argument("--votes", required=True, help="the battle log (e.g. GET /arena/api/battles.jsonl)")
    board.add_argument("--format", default="table", choices=["table", "json"])
    board.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples (Chatbot Arena uses 1000)")
    board.add_argument("--anchor", default=None, help="a model to pin at 1000 (default: the mean is 1000)")
    board.add_argument("--plot", default=None, help="also write the ratings and intervals to this .png or .svg")
    board.add_argument("--seed", type=int, default=0)
    judge = sub.add_parser("judge", help="an LLM judge (MT-bench style) over a question set, on an OpenAI server")
    judge.add_argument("--questions", default=None, help="JSONL of {id, category, turns, reference?} (default: "
                                                         "the 24 questions Kestrel ships)")
    judge.add_argument("--models", default=None, help="comma-separated models to judge, each NAME or "
                                                      "NAME@temperature=0.8:top_p=0.9 (sampling settings)")
    judge.add_argument("--judge", default="default", help="the judging model (NAME[@settings])")
    judge.add_argument("--mode", default="pairwise", choices=["pairwise", "single", "both"])
    judge.add_argument("--output", default="judgments.jsonl", help="judgments (JSONL); the answers and a summary "
                                                                   "go next to it")
    judge.add_argument("--battles", default=None, help="an arena battle log: judge its conversations and report "
                                                       "agreement with the human votes")
    judge.add_argument("--base-url", default="http://127.0.0.1:30000/v1", help="the OpenAI-compatible server")
    judge.add_argument("--api-key", default=None)
    judge.add_argument("--max-questions", type=int, default=None, help="only the first N questions")
    judge.add_argument("--explanation-chars", type=int, default=400, help="the most the judge may write before "
                                                                          "its verdict")
    judge.add_argument("--no-constrain", action="store_true", help="do not hold the judge to its verdict format "
                                                                   "with guided_regex (servers without it)")
    sqlp = sub.add_parser("sql", help="run SQL (DuckDB) with llm() calls over real tables")
    sqlp.add_argument("query", help="the query, e.g. \"SELECT llm('Summarise: {r}', Review) FROM 'reviews.parquet'\"")
    sqlp.add_argument("--explain", action="store_true", help="show the plan (rows, distinct prompts, order, "
                                                             "predicted prefix hit rate) without running the calls")
    sqlp.add_argument("--base-url", default=None, help="run the calls on this OpenAI-compatible server (default: "
                                                       "an engine in this process)")
    sqlp.add_argument("--api-key", default=None)
    sqlp.add_argument("--model-name", default="default", help="the model the server is asked for (with --base-url)")
    sqlp.add_argument("--order", default="ggr", choices=["ggr", "sorted", "original"],
                      help="the order calls run in: ggr groups rows that share long values (and orders the fields "
                           "of a template's {A, B, ...} record per row); sorted sorts rows by their fields")
    sqlp.add_argument("--keep-field-order", action="store_true",
                      help="render records' fields in the order the template lists them")
    sqlp.add_argument("--fd", action="append", default=None, metavar="'A -> B'",
                      help="a functional dependency to plan with (repeatable); default: discovered from the rows")
    sqlp.add_argument("--no-dedup", action="store_true", help="run identical prompts once per row")
    sqlp.add_argument("--max-tokens", type=int, default=64, help="per call, unless llm_with says otherwise")
    sqlp.add_argument("--temperature", type=float, default=0.0)
    sqlp.add_argument("--format", default="table", choices=["table", "csv", "jsonl"])
    sqlp.add_argument("--max-rows", type=int, default=40, help="rows shown in the table format")
    add_engine_args(sqlp)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "sql":
            return cmd_sql(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "arena":
            return cmd_arena(args)
        if args.command == "judge":
            return cmd_judge(args)
        if args.command == "bench":
            from kestrel.bench.client import print_summary, run_bench
            summary = run_bench(args)
            print_summary(summary)
            return 0 if summary["completed"] else 1
    except (ValueError, FileNotFoundError, TypeError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
