"""TVE's engine: everything between the node classes (``nodes/``) and the host-free math (``attention/``, ``flow/``).

It never imports ``nodes/``; only ``host.py`` imports ComfyUI. What lives where:

- ``host.py``           the one adapter to ComfyUI: every internal the pack touches, one named function each
- ``identity.py``       every node's id and display name (one table)
- ``sockets.py``        the custom socket types and the check that a value on one is what a TVE node made
- ``validation.py``     every input check: one clear error naming the input, before anything is patched
- ``methods.py``        the ``Method`` interface: what a TVE method on a MODEL may provide to the engine
- ``stack.py``          the methods on one MODEL (``MethodStack``), how they compose, putting them on a clone
- ``run.py``            the per-sampling-call state (``SamplingRun``) and the frame-index spaces
- ``passes.py``         the wrappers and routers that run a model's steps: source and edit passes, windowed
- ``frame_windows.py``  frames per pass: the setting, the schedules, blending
- ``inversion.py``      DDIM inversion and the ``Inversion`` (the source at every σ)
- ``masked_source.py``  masked edits: outside the mask the video follows its inversion
- methods: ``injection.py`` (PnP), ``cross_frame.py``, ``flatten.py``, ``tokenflow.py``
- ``motion_dynamics.py`` Text2Video-Zero's start latents; ``optical_flow.py`` RAFT / DIS flow for the flow node;
  ``feature_preview.py`` the feature PCA and NN-field pictures; ``one_shot.py`` and ``temporal_adapter.py`` EI²
  tuning and its adapter files
"""
