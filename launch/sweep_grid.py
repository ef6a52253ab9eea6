"""launch/sweep.sh's grid: `key=v1,v2 ...` -> one line per point, `<row>\t<overrides>`, each point's overrides
checked against the config by train.load_config (its keys and values) before the sweep runs anything.

    python launch/sweep_grid.py NAME CONFIG SEEDS key=v1,v2 [key2=w1,w2 ...] -- [fixed overrides ...]

Rows are named by their overrides (`loss.all_positive_bias=0.1`, several keys joined by `,`, '/' as '_'), in grid order
(the first key varies slowest). Bad input: one line `sweep.sh: error: ...`, exit 2 (cli.py's convention)."""
import itertools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402


def parse_grid(args: list[str]) -> list[tuple[str, list[str]]]:
    grid, keys = [], set()
    for arg in args:
        key, eq, values = arg.partition("=")
        items = values.split(",")
        if not eq or not key or not values or any(not v for v in items):
            raise ValueError(f"grid {arg!r}: expected key=v1,v2,... (a key, '=', non-empty values separated by commas)")
        if key in keys:
            raise ValueError(f"grid key {key} given twice")
        if len(set(items)) < len(items):
            raise ValueError(f"grid {arg!r}: a value is repeated")
        keys.add(key)
        grid.append((key, items))
    if not grid:
        raise ValueError("no grid: give at least one key=v1,v2,...")
    return grid


def points(grid) -> list[list[str]]:
    return [[f"{k}={v}" for (k, _), v in zip(grid, combo)] for combo in itertools.product(*(v for _, v in grid))]


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        cli.fail("sweep.sh", "usage: bash launch/sweep.sh NAME CONFIG key=v1,v2,... [--seeds N] [-- overrides]")
    name, config, seeds, rest = argv[0], argv[1], argv[2], argv[3:]
    grid_args, fixed = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        cli.fail("sweep.sh", f"NAME {name!r}: use letters, digits, '_', '.', '-' (it names a directory)")
    if not (seeds.isdigit() and int(seeds) >= 1):
        cli.fail("sweep.sh", f"--seeds {seeds!r}: must be an integer >= 1")
    if not os.path.isfile(config):
        cli.fail("sweep.sh", f"CONFIG {config}: no such file")
    try:
        grid = parse_grid(grid_args)
    except ValueError as e:
        cli.fail("sweep.sh", e)
    import train
    rows = []
    for point in points(grid):
        try:
            train.load_config(config, point + fixed, check_paths=False)
        except train.ConfigError as e:
            cli.fail("sweep.sh", f"{' '.join(point + fixed)}: {e}")
        row = ",".join(point).replace("/", "_")  # (a path value, e.g. data.train_path, names a directory too)
        if "\t" in row or " " in row or row.startswith("."):
            cli.fail("sweep.sh", f"grid point {row!r}: a value with a space or tab cannot name a run directory")
        rows.append(f"{row}\t{' '.join(point)}")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
