"""The deployment format: `<name>.onnx` (the detector as one ONNX graph) and its sidecar `<name>.onnx.json`.

- `mpad.deploy.graph` writes the model from a Detector (`mpad export`; needs the model code);
- `mpad.deploy.sidecar` owns the sidecar: what the model was made from and how to feed it;
- `mpad.deploy.runtime` runs the model on onnxruntime (`mpad predict --backend onnx`, `mpad serve`), with
  neither open_clip nor the model code.

Importing this package imports none of them.
"""
