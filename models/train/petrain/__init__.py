"""petrain: train, export and evaluate the petrestore restoration model.

Data comes from the project's own physical simulator
(`petlab dataset`, see crates/petsim/src/dataset.rs); the network is written in
JAX, trained on CPU, and exported by hand to an ONNX graph that
ONNX Runtime and tract both run.
"""
