"""The one-shot methods: SD-FSMIS and DPL, two models behind one interface
(:class:`~sdfsmis.models.base.OneShotModel`) that the volume segmenter, the trainer, the app,
the evaluation harness and the benchmark use alike."""
