"""Quality-improvement reports (survival statistics are pure; queries and views use Django)."""
