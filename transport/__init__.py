"""How new weights travel from the learner to the generators, behind one small interface.

`base` defines the interface (`WeightTransport`), the handle a publish returns and the `WeightReceiver`
protocol a generator implements; `registry` maps config names to transports. Pull (the generator fetches at
its next safe point): `object_store`, `disk`, `shared_memory` (slots in /dev/shm served in place). Push (publish
applies the version in every generator through vLLM's weight-transfer engine API, `push`): `nccl` on GPUs,
`relay_cpu` on one CPU host.

This file imports nothing, so importing one transport module never imports the others.
"""
