"""Training in the swarm: model, data, optimizers, loop, state sync, checkpoints.

:mod:`~legion_swarm.config.model` holds the model and data settings every member shares (published, hashed and
signed in the DHT as part of the swarm config); :mod:`~legion_swarm.train.model` builds the model they describe
(TinyGPT presets or a Hugging Face causal LM); :mod:`~legion_swarm.train.data` loads the tokens (the built-in
offline corpus, a synthetic language, local files or a Hub dataset), holds out the validation split, cuts the
rest into the shards peers lease, and batches a shard deterministically so another peer can resume it; the
optimizers, modes, loop and state sync turn a group of peers into one training run.
"""
