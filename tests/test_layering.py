"""The package's import graph: no cycles, no import from a lower layer to a higher one, no ``_private``
name imported from another module.  Read with ``ast`` (module-level and function-level imports alike),
so it costs no imports and sees the lazy ones too."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

from poa_hpc.distributed.registry import engine_class, engine_names, get_engine

ROOT = Path(__file__).resolve().parents[1] / "poa_hpc"

# Low to high: a module may import its own layer and the layers below it.  The longest matching
# prefix decides a module's layer.  A `commands` module (one registering `poa` subcommands) is an entry
# point: it sits at the top with the `poa` command itself, and nothing but `poa_hpc.cli` imports it.
LAYERS = [
    ["poa_hpc", "poa_hpc.errors", "poa_hpc.commands", "poa_hpc.results", "poa_hpc.files",
     "poa_hpc.distributed.registry", "poa_hpc.data.registry"],  # no dependencies (the engine and dataset registries)
    ["poa_hpc.kernels"],                                        # kernels know nothing of POA
    ["poa_hpc.models", "poa_hpc.losses"],                       # the model knows nothing of engines
    ["poa_hpc.config", "poa_hpc.config_docs"],
    ["poa_hpc.data", "poa_hpc.checkpoint"],
    ["poa_hpc.train.meta_arch", "poa_hpc.train.optim", "poa_hpc.train.schedules", "poa_hpc.train.stop",
     "poa_hpc.train.watchdog", "poa_hpc.train.load"],            # the step
    ["poa_hpc.distributed"],                                    # engines wrap the step
    ["poa_hpc.perf"],                                           # measuring the step
    ["poa_hpc.eval"],                                           # evaluating a teacher (k-NN, probes, sweeps)
    ["poa_hpc.train"],                                          # the loop (knows nothing of Slurm; k-NN along the run)
    ["poa_hpc.launch", "poa_hpc.bench", "poa_hpc.perf.profile", "poa_hpc.plot"],  # jobs, benchmarks, the profiler
    ["poa_hpc.cli", "poa_hpc.__main__"],                        # entry points (and every `commands` module)
]
# Edges known to break the rules, each with the work that removes it.
KNOWN: set = set()


def modules() -> dict:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def imports(name: str):
    """``(target module, imported name or None, line)`` for every poa_hpc import of ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("poa_hpc"):
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if not base.startswith("poa_hpc"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # `from poa_hpc.perf import fake`: the module itself
                    yield sub, None, node.lineno
                else:
                    yield base, a.name, node.lineno


@functools.lru_cache(maxsize=1)
def graph() -> dict:
    return {m: {t for t, _, _ in imports(m) if t != m} for m in MODULES}


def is_command_module(name: str) -> bool:
    return name.rpartition(".")[2] in ("commands", "command") and name != "poa_hpc.commands"


def layer(name: str) -> int:
    if is_command_module(name):
        return len(LAYERS) - 1
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{name}: declare its layer in LAYERS"
    return found


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_no_upward_imports():
    bad = []
    for m, targets in graph().items():
        for t in targets:
            if t not in MODULES or (m, t) in KNOWN:
                continue
            if layer(t) > layer(m):
                bad.append(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})")
            if is_command_module(t) and m != "poa_hpc.cli":
                bad.append(f"{m} imports the command module {t}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    edges = {m: {t for t in ts if t in MODULES and (m, t) not in KNOWN} for m, ts in graph().items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_lazy_and_relative_imports():
    g = graph()
    assert "poa_hpc.data.samplers" in g["poa_hpc.data.dali"]  # relative, module level
    assert "poa_hpc.data.dali" in g["poa_hpc.data.loader"]  # relative, inside a function
    assert "poa_hpc.launch.run" in g["poa_hpc.launch.commands"]  # absolute, inside a function


def test_no_private_names_from_other_modules():
    bad = [f"{m}:{line} imports {t}.{n}" for m in MODULES for t, n, line in imports(m)
           if n and n.startswith("_") and not n.startswith("__") and t != m]
    assert not bad, "\n".join(bad)


def test_every_command_has_help():
    """``poa --help`` and every registered subcommand's ``--help`` (one process: the parsers themselves)."""
    from poa_hpc.cli import build_parser
    from poa_hpc.commands import registered_commands

    parser = build_parser()
    commands = registered_commands()
    assert {" ".join(w) for w in commands} >= {"train", "submit", "extract", "export", "subnets", "demo", "profile",
                                               "eval knn", "eval sweep", "eval linear", "bench engines",
                                               "bench data", "estimate memory", "estimate flops", "estimate comm"}
    for words in [(), *{w[:1] for w in commands if len(w) > 1}, *commands]:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*words, "--help"])
        assert exc.value.code == 0, words



@pytest.mark.parametrize("name", engine_names())
def test_engine_contract(name):
    """Every registered engine: its class loads and carries the name, the config accepts it, the estimators and
    the bench derive their choices from the registry."""
    from poa_hpc.config import load_config
    from poa_hpc.distributed.engines import Engine
    from poa_hpc.perf.comm import comm_engines
    from poa_hpc.perf.memory import memory_engines

    spec = get_engine(name)
    cls = engine_class(name)
    assert issubclass(cls, Engine) and cls.name == name
    assert load_config("configs/demo_cpu.yaml", [f"dist.engine={name}"]).dist.engine == name
    assert (name in memory_engines()) == bool(spec.memory)
    assert (name in comm_engines()) == (spec.distributed and bool(spec.comm))
    for variant in spec.variants:
        base, _, suffix = variant.partition(":")
        assert base == name
        load_config("configs/demo_cpu.yaml", [f"dist.engine={name}", *spec.variant_overrides(suffix)])
    shard = spec.sharding(load_config("configs/demo_cpu.yaml", [f"dist.engine={name}"]).dist)
    assert not (shard.params and not shard.grads) and not (shard.grads and not shard.optimizer)  # ZeRO's nesting
