"""poa_hpc: POA (Pre-training Once for models of All sizes) trainer."""

__version__ = "0.1.0"


def version_string() -> str:
    """``poa_hpc 0.1.0 (commit abc1234)``: the package version and, from a git checkout, its commit."""
    import subprocess
    from pathlib import Path

    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"poa_hpc {__version__} (commit {commit or 'unknown: not a git checkout'})"
