"""Federated datasets: a user's own data through :func:`from_arrays`,
:func:`from_torch_dataset` and :func:`from_hf`, and generated ones (no download).

Every dataset here follows :class:`dpfl.api.FederatedDataset`: users ``0 .. num_users - 1``,
each user's data on demand.
"""

from dpfl.api import TensorData
from dpfl.data.adapters import (
    ArrayFederatedDataset,
    HFFederatedDataset,
    LazyData,
    TorchFederatedDataset,
    from_arrays,
    from_hf,
    from_torch_dataset,
)
from dpfl.data.federated import (
    PartitionedDataset,
    SyntheticClassification,
    partition_by_key,
    partition_dirichlet,
    partition_iid,
)

__all__ = [
    "ArrayFederatedDataset",
    "HFFederatedDataset",
    "LazyData",
    "PartitionedDataset",
    "SyntheticClassification",
    "TensorData",
    "TorchFederatedDataset",
    "from_arrays",
    "from_hf",
    "from_torch_dataset",
    "partition_by_key",
    "partition_dirichlet",
    "partition_iid",
]
