"""The ground floor: data contracts, storage URIs and the feature-table format, Beam-free.

Every other package may import these modules; they import only pyarrow, numpy and polars.
"""
