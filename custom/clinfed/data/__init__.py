"""Site data: synthetic generation, DICOM and FHIR ingestion, pseudonymisation, cohorts."""
