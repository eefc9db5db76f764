#!/bin/bash
# Balsam pilot job: {{ job_name }}
#SBATCH --job-name={{ job_name }}
#SBATCH --nodes={{ num_nodes }}
#SBATCH --time={{ wall_time_min }}
{% if queue %}
#SBATCH --partition={{ queue }}
{% endif %}
{% if project %}
#SBATCH --account={{ project }}
{% endif %}
#SBATCH --exclusive
{% if sched_directives %}
{{ sched_directives }}
{% endif %}

cd "{{ workdir }}"
{{ env_exports }}
{% if preamble %}
{{ preamble }}
{% endif %}

{{ launcher_command }}
