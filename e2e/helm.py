#!/usr/bin/env python3
"""Helm for the end-to-end suite, through helm-sdkpy (the Helm v4 library) when no `helm` binary is around.

    helm.py lint CHART
    helm.py install --kubeconfig K --namespace NS RELEASE CHART [--set a.b=c ...] [--wait] [--timeout S]
    helm.py uninstall --kubeconfig K --namespace NS RELEASE

Exits 0 on success. Exit code 3 means helm-sdkpy is not installed, so callers can tell a missing
tool from a failing chart.
"""

import argparse
import asyncio
import json
import sys

MISSING_LIBRARY = 3


def parse_set(pairs):
    """`--set` values as Helm reads them: dotted keys, true/false/null/integers typed, the rest strings."""
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r} is not key=value")
        if raw in ("true", "false"):
            value = raw == "true"
        elif raw == "null":
            value = None
        elif raw.lstrip("-").isdigit():
            value = int(raw)
        else:
            value = raw
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return values


def lint(helm, args):
    result = asyncio.run(helm.Lint(helm.Configuration()).run(args.chart))
    # Severities: 1 info, 2 warning, 3 error. helm-sdkpy 0.1.32 returns empty error texts, so
    # the path and severity are printed too.
    messages = result.get("Messages") or []
    worst = 0
    for message in messages:
        severity = message.get("Severity", 0)
        worst = max(worst, severity)
        label = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(severity, str(severity))
        print(f"[{label}] {message.get('Path', '')}: {message.get('Err') or ''}")
    print(json.dumps({"messages": len(messages), "worst_severity": worst}))
    return 1 if worst >= 3 else 0


def install(helm, args):
    config = helm.Configuration(namespace=args.namespace, kubeconfig=args.kubeconfig)
    result = asyncio.run(
        helm.Install(config).run(
            args.release,
            args.chart,
            values=parse_set(args.set),
            create_namespace=True,
            wait=args.wait,
            timeout=args.timeout,
        )
    )
    print(json.dumps({k: result.get(k) for k in ("name", "namespace", "version", "status") if k in result}))
    return 0


def uninstall(helm, args):
    config = helm.Configuration(namespace=args.namespace, kubeconfig=args.kubeconfig)
    asyncio.run(helm.Uninstall(config).run(args.release, wait=args.wait, timeout=args.timeout))
    print(json.dumps({"uninstalled": args.release}))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("lint")
    p.add_argument("chart")
    p.set_defaults(run=lint)

    for name, run in (("install", install), ("uninstall", uninstall)):
        p = commands.add_parser(name)
        p.add_argument("--kubeconfig", required=True)
        p.add_argument("--namespace", default="default")
        p.add_argument("--wait", action="store_true")
        p.add_argument("--timeout", type=int, default=300)
        p.add_argument("release")
        if name == "install":
            p.add_argument("chart")
            p.add_argument("--set", action="append", default=[])
        p.set_defaults(run=run)

    args = parser.parse_args()
    try:
        import helm_sdkpy as helm
    except ImportError as e:
        print(f"helm-sdkpy is not installed ({e}): pip install --ignore-requires-python helm-sdkpy", file=sys.stderr)
        return MISSING_LIBRARY
    try:
        return args.run(helm, args)
    except helm.HelmError as e:
        print(f"helm {args.command} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
