"""Human judges: the rating page (`cpe-ray rate`), its task and judgement files, analysis."""
