"""Making safety vectors: the bundled data and its splits (`data`), the paper's function vector (`heads`,
`function_vector`), the gradient-trained vector shipped as the default (`optimized`), the harm gate's fit
(`gate_fit`) and the calibration sweep that picks layer, scale and gate sharpness (`calibration`, `prepass`,
`sharpness`, `calibration_report`). Only `runtime`, `method` and `models` are imported from here."""
