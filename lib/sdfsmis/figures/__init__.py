"""Pictures of results, beside the numbers: overlay montages of slices with contours, training
curves, TensorBoard events, the evaluation box plot and its HTML report. Drawn with matplotlib's
Agg canvas (no display, no pyplot state), so they render the same on a headless server."""
