"""A trained model meets images and clients: prediction, the web page and its API, ONNX export."""
