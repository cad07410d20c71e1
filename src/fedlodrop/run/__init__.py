"""A whole run: its folder (`folder`, the one reader and writer), what it is built from
(`experiment`), the loop every engine shares (`engine`) and the in-process engine (`inprocess`),
scoring the global model (`evaluation`), the simulated clock and meter (`meter`), and logs."""
