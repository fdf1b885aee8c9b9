"""One-line docs of every config key, read from the schema's own comments.

A key's doc is the comment at the end of its field's line in the dataclass, or else the comment lines
right above the field (joined); ``model.<family>`` sections are documented the same way in their own
modules.  ``poa config show`` prints them next to the keys; a test checks that every key has one.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import tokenize
from functools import cache
from io import StringIO
from typing import Any, Dict, Optional

from poa_hpc.commands import register_command

__all__ = ["key_docs", "field_comments", "commented_yaml", "ConfigShowCommand"]

_FIELD = re.compile(r"^\s*(?:\(\s*[\"'](\w+)[\"']\s*,|(\w+)\s*:)")


@cache
def field_comments(cls: type) -> Dict[str, str]:
    """Field name -> doc for ``cls`` and the dataclasses it derives from (``DataConfig`` is made from
    ``_DataFields`` plus the registered datasets' sections)."""
    out: Dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if base is not object and dataclasses.is_dataclass(base):
            out.update(_own_field_comments(base))
    return out


def _own_field_comments(cls: type) -> Dict[str, str]:
    """Field name -> doc from the comments of ``cls``'s source (a dataclass; ``make_dataclass`` calls whose
    fields are ``("name", type, ...)`` tuples are read the same way from the function defining them)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        src = ""
    if not src and getattr(cls, "__name__", "") == "ModelConfig":
        from poa_hpc import config

        src = inspect.getsource(config._model_config_cls)
    comments: Dict[int, str] = {}
    code_lines = set()
    for tok in tokenize.generate_tokens(StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    out: Dict[str, str] = {}
    lines = src.splitlines()
    for i, line in enumerate(lines, start=1):
        m = _FIELD.match(line)
        name = m and (m.group(1) or m.group(2))
        if not name or name not in names or name in out:
            continue
        if i in comments and i in code_lines:  # trailing comment
            doc = comments[i]
        else:  # the comment block right above
            above, j = [], i - 1
            while j in comments and j not in code_lines:
                above.insert(0, comments[j])
                j -= 1
            doc = " ".join(above)
        if doc:
            out[name] = doc
    return out


def key_docs(cfg_cls: Optional[type] = None, prefix: str = "") -> Dict[str, str]:
    """Dotted key -> one-line doc for every leaf key of the schema (empty string when undocumented)."""
    from poa_hpc.config import POAConfig

    cls = cfg_cls or POAConfig
    docs: Dict[str, str] = {}
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        sub = _dataclass_type(cls, f)
        if sub is not None:
            docs[key] = comments.get(f.name, "")
            docs.update(key_docs(sub, key + "."))
        else:
            docs[key] = comments.get(f.name, "")
    if prefix == "data.":  # the dataset sections are added by the registry (poa_hpc/data/registry.py)
        from poa_hpc.data.registry import dataset_names

        for name in dataset_names():
            if f"data.{name}" in docs and not docs[f"data.{name}"]:
                docs[f"data.{name}"] = f"options of the {name} dataset, used when data.dataset={name}"
    if prefix == "model.":  # the family sections are added by the registry (poa_hpc/models/registry.py)
        from poa_hpc.models.registry import backbone_names, get_backbone

        for name in backbone_names():
            spec = get_backbone(name)
            docs[f"model.{name}"] = docs.get(f"model.{name}") or f"the {name} family, used when model.arch={name}: {spec.description}"
    return docs


def _dataclass_type(cls: type, f: dataclasses.Field) -> Optional[type]:
    t = f.type
    if isinstance(t, str):  # postponed annotations
        import typing

        try:
            t = typing.get_type_hints(cls)[f.name]
        except Exception:
            t = None
    if t is None and f.default_factory is not dataclasses.MISSING:
        t = type(f.default_factory())
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _scalar(v: Any) -> str:
    import yaml

    text = yaml.safe_dump(v, default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def commented_yaml(data: Dict[str, Any], docs: Dict[str, str], prefix: str = "", indent: int = 0) -> str:
    """``data`` (nested dicts) as block YAML with each key's doc as a trailing comment."""
    out = []
    pad = "  " * indent
    for k, v in data.items():
        key = prefix + k
        doc = docs.get(key, "")
        note = f"  # {doc}" if doc else ""
        if isinstance(v, dict) and v and key in docs and any(d.startswith(key + ".") for d in docs):
            out.append(f"{pad}{k}:{note}")
            out.append(commented_yaml(v, docs, key + ".", indent + 1))
        else:
            out.append(f"{pad}{k}: {_scalar(v)}{note}")
    return "\n".join(line for line in out if line)


def _diff(data: Dict[str, Any], default: Dict[str, Any], docs: Dict[str, str], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in data.items():
        key, d = prefix + k, default.get(k, object())
        if isinstance(v, dict) and isinstance(d, dict) and any(x.startswith(key + ".") for x in docs):
            sub = _diff(v, d, docs, key + ".")  # a section: only its keys that differ
            if sub:
                out[k] = sub
        elif v != d:
            out[k] = v
    return out


@register_command("config show")
class ConfigShowCommand:
    """Print the merged config as YAML, each key with its one-line doc.

    Defaults <- --config (a path, or a packaged name such as demo_cpu or vit_l_poa) <- overrides.
    --diff prints only the keys that differ from the defaults (a YAML that --config accepts)."""

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--config", help="YAML file or packaged config name (demo_cpu, vit_l_poa, ...)")
        parser.add_argument("--diff", action="store_true", help="only the keys that differ from the defaults")
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3")

    @staticmethod
    def run(args) -> int:
        from poa_hpc.config import POAConfig, load_config, to_dict

        cfg = load_config(args.config, args.overrides)
        data = to_dict(cfg)
        if args.diff:
            data = _diff(data, to_dict(POAConfig()), key_docs())
        where = args.config or "defaults"
        print(f"# poa_hpc config: {where}" + (" " + " ".join(args.overrides) if args.overrides else "")
              + (" (only what differs from the defaults)" if args.diff else ""))
        if data:
            print(commented_yaml(data, key_docs()))
        return 0
