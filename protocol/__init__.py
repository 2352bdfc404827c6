"""What travels on the wire, and how it is checked: pure, importable anywhere.

Layer one of four: it imports no other fedge package, and no paho, OpenCV, LiteRT or
TensorFlow (numpy only in the tensor codec); ``tests/protocol/test_layering.py`` holds it
to that. The public names, by module:

- ``protocol.errors``: :class:`FedgeError`, the root of every fedge error, and its kinds.
- ``protocol.topics``: :class:`Topics`, every MQTT topic built and parsed in one place.
- ``protocol.messages``: the frozen pydantic messages; ``protocol.messages.codec``'s
  :func:`decode_message` and :func:`encode_message`.
- ``protocol.frames``: frame payloads (:func:`decode_frame`, :func:`encode_envelope`).
- ``protocol.chunks``: blobs split into bounded MQTT payloads and put back together.
- ``protocol.tensors`` and ``protocol.updates``: weights and updates as safetensors blobs.
- ``protocol.signing``: Ed25519 signatures (:class:`SigningKey`, :class:`VerifyKey`).
- ``protocol.preprocess`` and ``protocol.tasks``: :class:`PreprocessSpec` and
  :class:`TaskSpec`, what a model expects and what a fleet learns.
- ``protocol.secagg`` and ``protocol.split``: the arithmetic of secure aggregation and the
  bookkeeping of split learning.

Nothing is imported here, so ``import protocol.topics`` loads only what it needs.
"""
