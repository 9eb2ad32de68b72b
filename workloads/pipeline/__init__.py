"""`llmc pipeline RECIPE` (`kind: pipeline`): existing recipes run as stages in order by one driver, later stages
reading earlier stages' outputs (`${stages.NAME.outputs.KEY}`), gates on a stage's summary numbers, and reruns that
skip every stage whose inputs are unchanged."""
