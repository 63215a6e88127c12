"""Smaller bases around LoRA: structured pruning of decoder blocks (``structure``), LoRAM's train-small /
infer-large recovery (``loram``). LoRAPrune's pruning during fine-tuning is a training procedure
(``lorakit.training.procedures.loraprune``); QLoRA's 4-bit base is ``lorakit.quantize``."""
