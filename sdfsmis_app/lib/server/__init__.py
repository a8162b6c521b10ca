"""What the app adds to MONAI Label's server: endpoints, authentication, bounded concurrency,
safe sessions, a validating datastore and a DICOMweb datastore. The tasks (``configs``,
``infers``, ``trainers``) do not depend on these, except the inference gate."""
