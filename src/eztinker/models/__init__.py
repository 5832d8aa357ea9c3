"""Pydantic schemas shared by the engine, the server facades and the clients."""

from eztinker.models.configs import LoRAConfig, LossFunctionConfig

__all__ = ["LoRAConfig", "LossFunctionConfig"]
