"""Set membership and lookup on string columns through Arrow's hash kernels.

pandas' isin/map on Arrow-backed strings loop in Python; these stay in C++ for the
million-span tables of a large trace directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


def arrow_strings(values):
    """A Series (or iterable) of strings as one Arrow string array, without Python loops."""
    import pandas as pd
    import pyarrow as pa

    if not isinstance(values, pd.Series):
        values = pd.Series(list(values), dtype=object)
    arr = pa.array(values, from_pandas=True) if values.dtype == object else pa.array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr if arr.type == pa.string() else arr.cast(pa.string())


def fast_isin(values: pd.Series, wanted) -> np.ndarray:
    """values.isin(wanted) as a bool array."""
    import numpy as np
    import pyarrow.compute as pc

    found = pc.is_in(arrow_strings(values), value_set=arrow_strings(wanted).drop_null())
    return np.asarray(found.fill_null(False), dtype=bool)


def fast_positions(values: pd.Series, table_index) -> np.ndarray:
    """Position of each value in table_index (unique strings), -1 where absent."""
    import numpy as np
    import pyarrow.compute as pc

    pos = pc.index_in(arrow_strings(values), value_set=arrow_strings(table_index))
    return np.asarray(pos.fill_null(-1), dtype=np.int64)
