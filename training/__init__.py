"""Weight training on the served model: context-frozen ORPO/SFT through APOLLO in a HOGWILD worker process.

Sub-packages with jobs of their own: `vectors` (fitting the emotion readout from the corpus) and
`checkpoint` (syncing the trained weights into the model directory, block by block).
"""
