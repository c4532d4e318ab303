// Command control-plane runs a real Kubernetes control plane on loopback for ec2-kubelet's
// end-to-end tests and demo: embedded etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler, built from Kubernetes' own modules (see go.mod for the version).
//
//	control-plane [flags]               start everything, print "ready", stop on SIGTERM/SIGINT
//	control-plane kube-apiserver ...    one component, as its upstream binary (used by the above)
//
// The three components run as child processes of the launcher (each registers process-wide
// state: signal handling, feature gates, component globals); etcd runs inside the launcher.
package main

import (
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func component(name string) func() *cobra.Command {
	switch name {
	case "kube-apiserver":
		return apiserver.NewAPIServerCommand
	case "kube-controller-manager":
		return controllermanager.NewControllerManagerCommand
	case "kube-scheduler":
		return func() *cobra.Command { return scheduler.NewSchedulerCommand() }
	}
	return nil
}

func main() {
	if len(os.Args) > 1 {
		if build := component(os.Args[1]); build != nil {
			command := build()
			command.SetArgs(os.Args[2:])
			os.Exit(cli.Run(command))
		}
	}
	os.Exit(up(os.Args[1:]))
}
