"""Optional sink: mirror scored partitions into an Apache Iceberg table (pyiceberg), one atomic
overwrite of the run's dates per run. Locally a SQLite catalog; any pyiceberg catalog URI works.

Target syntax: `CATALOG_URI#namespace.table`, e.g. `sqlite:////tmp/popcast/catalog.db#popcast.scored`
(the warehouse is the folder `warehouse/` beside the SQLite file).
"""
from __future__ import annotations

import os
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc

from featurizers.core import storage
from featurizers.core.feature_table import read_columns

__all__ = ["parse_target", "open_catalog", "with_partition_column", "overwrite_partitions"]

PARTITION_COLUMN = "dt"


def parse_target(target: str) -> tuple[str, str, str]:
    if "#" not in target:
        raise ValueError(f"iceberg target {target!r} must look like CATALOG_URI#namespace.table")
    uri, identifier = target.rsplit("#", 1)
    if "." not in identifier:
        raise ValueError(f"iceberg table {identifier!r} must be namespace.table")
    namespace, name = identifier.split(".", 1)
    return uri, namespace, name


def open_catalog(uri: str):
    from pyiceberg.catalog.sql import SqlCatalog
    if uri.startswith("sqlite:///"):
        db_path = uri[len("sqlite:///"):]
        warehouse = os.path.join(os.path.dirname(os.path.abspath(db_path)), "warehouse")
        os.makedirs(warehouse, exist_ok=True)
        return SqlCatalog("popcast", uri=uri, warehouse=f"file://{warehouse}")
    from pyiceberg.catalog import load_catalog
    return load_catalog("popcast", uri=uri)


def with_partition_column(table: pa.Table) -> pa.Table:
    return table.append_column(PARTITION_COLUMN, pc.cast(table.column("publish_time"), pa.date32()))


def overwrite_partitions(target: str, table_root: str, dates: list[date]) -> int:
    """Replace the given dates in the Iceberg table with TABLE/dt=D/ as just published; returns rows written."""
    from pyiceberg.expressions import In

    uri, namespace, name = parse_target(target)
    catalog = open_catalog(uri)
    parts = [read_columns(storage.join(table_root, f"dt={d}"), None) for d in dates]
    parts = [p for p in parts if p is not None]
    if not parts:
        return 0
    rows = with_partition_column(pa.concat_tables(parts, promote_options="permissive"))
    catalog.create_namespace_if_not_exists(namespace)
    identifier = f"{namespace}.{name}"
    if not catalog.table_exists(identifier):
        iceberg = catalog.create_table(identifier, schema=rows.schema)
        with iceberg.update_spec() as update:
            update.add_identity(PARTITION_COLUMN)
    iceberg = catalog.load_table(identifier)
    rows = rows.cast(iceberg.schema().as_arrow())
    iceberg.overwrite(rows, overwrite_filter=In(PARTITION_COLUMN, [d.isoformat() for d in dates]))
    return rows.num_rows
