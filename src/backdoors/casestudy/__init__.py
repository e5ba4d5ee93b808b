"""The case study: RUBiS, a multi-tier auction service (PostgreSQL back end, recoverable
middle tier and front end), made recoverable with backdoors and measured under load."""
