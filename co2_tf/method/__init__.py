"""The method (the paper): the CO2 model and its losses."""
