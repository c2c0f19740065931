"""The checks before a caption run: its inputs and its output, before any model loads.

Imports no JAX: the command line runs them before it loads anything heavy, so a typo answers
at once rather than after JAX's import (docs/results/history.md, "Start-up and compilation"),
and ``run_pipeline`` takes the inputs they return without listing them again.
"""

from __future__ import annotations

from flax_captioner import ownership, storage
from flax_captioner.errors import DataError
from flax_captioner.options import CaptionOptions, output_format
from flax_captioner.sources import PIPE_PREFIX, CheckedInputs, Inputs, check_inputs, iter_inputs
from flax_captioner.writers import check_writable


def check_run(inputs: Inputs, output: str | None,
              options: CaptionOptions | None = None) -> tuple[CheckedInputs, str]:
    """Fails fast on inputs or an output that would make a run pointless; call it before
    loading a model. Returns the checked inputs (``sources.check_inputs``; pass them to
    ``run_pipeline``, which then lists nothing again) and the output format
    (``options.output_format``). ``options``: the run's (its format, storage options and
    input columns apply).

    Local inputs are also read up to their first image, so an empty path list or table fails
    here. Remote and ``pipe:`` inputs are not: a bucket prefix would be listed in full once
    more, and a command run twice, so a run learns of their emptiness after the load.

    Raises:
      DataError: a glob matches nothing, a path list or tar shard does not exist, a
        directory holds no image files, or local inputs name no image at all.
      OutputError: the output's directory is missing or not writable, or it is a directory;
        it is an input; another run is writing it; it exists and is not this tool's output,
        or holds rows of another format to resume.
      ValueError: a refused or unknown output suffix, a format it contradicts, or Parquet to
        stdout.
    """
    options = options or CaptionOptions()
    format_ = output_format(output, options.output_format)
    storage_options = options.storage_options
    columns = {"image_column": options.image_column, "id_column": options.id_column}
    checked = check_inputs(inputs, storage_options, **columns)
    if not any(storage.is_remote(spec) or spec.startswith(PIPE_PREFIX)
               for spec in checked.specs) and \
            next(iter_inputs(checked, storage_options, **columns), None) is None:
        raise DataError(f"{' '.join(checked.names)}: no images to caption")
    if output is not None:
        check_writable(output, storage_options)
        ownership.check_not_input(output, checked)
        ownership.check_unlocked(output, storage_options)
        ownership.check_existing(output, format_, resume=options.resume,
                                 storage_options=storage_options)
    return checked, format_
