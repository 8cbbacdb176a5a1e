"""Stage two: pooling heads (`heads`), head training (`train`), evaluation and fusion (`evaluate`),
plots (`plots`), temporal localization (`localize`), detection evaluators (`detection`), MMD (`mmd`)."""
