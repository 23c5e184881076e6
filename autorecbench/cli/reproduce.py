"""``autorecbench reproduce NAME``: one command per registered reproduction (``autorecbench.reproduce``)."""

from __future__ import annotations

import typer

from autorecbench.reproduce import REPRODUCTIONS

reproduce_app = typer.Typer(help="Reproduce a paper's table: run its grid, print ours beside the paper's values. "
                            "Extra Hydra overrides apply to every run, launchers included (e.g. "
                            "`hydra/launcher=submitit_slurm`, `hydra/launcher=ray`).",
                            no_args_is_help=True, rich_markup_mode="markdown")


@reproduce_app.callback()
def _single_process() -> None:
    from autorecbench.launch import single_process_only

    single_process_only("reproduce")

for _item in REPRODUCTIONS:
    _module = _item.load()
    reproduce_app.command(
        _item.name,
        short_help=_item.summary,
        epilog=getattr(_module, "EPILOG", None),
        context_settings=getattr(_module, "CONTEXT_SETTINGS", None),
    )(_module.command)
