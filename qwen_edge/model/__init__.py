"""The files a model lives in: checkpoints (config + safetensors, memory-mapped), PEFT adapters, the artifact directory
(manifest, hashes), synthesized tiny checkpoints and their training."""
