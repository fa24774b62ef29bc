"""Reading an output's manifest in tests: every committed row once, as a DataFrame with each image's location."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from orchestrator.output.manifest import Manifest
from orchestrator.output.storage import Output


def manifest_frame(out: Output | str) -> pd.DataFrame:
    """The committed rows of an output (through the Manifest, as consumers are told to), with `image_uri`."""
    output = out if isinstance(out, Output) else Output(out)
    table = Manifest(output).read_all()
    frame = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}.get)
    # Nullable integer columns stay integers (a 63-bit seed does not survive a float).
    frame["image_uri"] = [output.uri_of(key) if isinstance(key, str) else None for key in frame["image_key"]]
    return frame
