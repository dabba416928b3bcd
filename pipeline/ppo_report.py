"""Console output of the PPO stage: a rich table of sample completions."""

from __future__ import annotations


def print_samples(texts: list[tuple[str, str, float]], iteration: int, judge=None, n: int = 4) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"PPO samples, iteration {iteration}", show_lines=True)
    table.add_column("prompt", overflow="fold", ratio=2)
    table.add_column("response", overflow="fold", ratio=3)
    table.add_column("RM score", justify="right")
    if judge is not None:
        table.add_column("gold", justify="right")
    for prompt, response, score in texts[:n]:
        row = [prompt, response, f"{score:.3f}"]
        if judge is not None:
            row.append(f"{judge(prompt, response):.2f}")
        table.add_row(*row)
    Console().print(table)
