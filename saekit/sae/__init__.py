"""SAE architectures: the contract (base), the registry, and one file per architecture."""

from saekit.sae.base import ForwardOutput, LossOutput, SAEConfig, SparseAutoencoder, SparseCode
from saekit.sae.registry import architectures, create, get_class, load_sae, register, save_sae

__all__ = ["ForwardOutput", "LossOutput", "SAEConfig", "SparseAutoencoder", "SparseCode", "architectures",
           "create", "get_class", "load_sae", "register", "save_sae"]
