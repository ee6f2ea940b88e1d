"""Periodic, atomic, keep-N checkpoints of the train state and the data position (orbax).

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact and the partial one invisible. Restoring places every array directly
into the sharding of the current run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from llmopt_jax.errors import CheckpointError


def complete_steps(directory: str) -> list[int]:
    """The steps of ``directory``'s finalized checkpoints, ascending; saves in flight or abandoned are excluded."""
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.step.checkpoint_steps(directory))


class Checkpointer:
    """Saves ``{"state": train state, "data": data-iterator position}`` under ``directory``."""

    def __init__(self, directory: str, save_every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(save_every)),
            max_to_keep=max(1, int(keep)),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def maybe_save(self, step: int, state: Any, data_position: dict, force: bool = False) -> bool:
        """Saves when ``step`` is on the interval (or ``force``); returns whether a save started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """``(state, data_position)`` of ``step``, arrays placed like ``abstract_state``'s shardings."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {self.directory} into this run "
                f"(different model or optimizer config?): {str(e).splitlines()[0]}"
            ) from e
        return restored["state"], dict(restored["data"])

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for any asynchronous save to be committed, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
