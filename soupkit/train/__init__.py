"""SFT and reward-model training: thin wrappers over TRL's SFTTrainer and RewardTrainer."""

from soupkit.train.data import load_rows
from soupkit.train.trainers import train_reward_model, train_sft

__all__ = ["load_rows", "train_reward_model", "train_sft"]
